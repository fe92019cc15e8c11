// containerd's own snapshotter conformance suite (snapshots/testsuite, from
// Debian's golang-github-containerd-containerd-dev, containerd 1.6) run
// against lazybd-snapshotter through containerd's proxy client: every test
// gets a fresh daemon on the root the suite hands out.
//
// Run by tests/tests/snapshotter_conformance.rs (hack/test.sh), which sets
// LAZYBD_SNAPSHOTTER to the built binary:
//   GO111MODULE=off GOPATH=/usr/share/gocode go test ./tests/conformance
package conformance

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

func newSnapshotter(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	bin := os.Getenv("LAZYBD_SNAPSHOTTER")
	if bin == "" {
		return nil, nil, fmt.Errorf("LAZYBD_SNAPSHOTTER is not set")
	}
	// Unix socket paths are limited to 108 bytes; the suite's roots are long.
	sockDir, err := os.MkdirTemp("", "lazybd-conf-")
	if err != nil {
		return nil, nil, err
	}
	sock := filepath.Join(sockDir, "s.sock")
	log, err := os.Create(filepath.Join(root, "snapshotter.log"))
	if err != nil {
		return nil, nil, err
	}
	cmd := exec.Command(bin,
		"--root", filepath.Join(root, "state"),
		"--address", sock,
		"--control-address", filepath.Join(sockDir, "c.sock"),
		"--metrics-address", "")
	cmd.Stdout = log
	cmd.Stderr = log
	if err := cmd.Start(); err != nil {
		return nil, nil, err
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.Dial("unix", sock)
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			return nil, nil, fmt.Errorf("lazybd-snapshotter did not serve %s in 30s", sock)
		}
		time.Sleep(20 * time.Millisecond)
	}
	conn, err := grpc.Dial("unix://"+sock, grpc.WithInsecure())
	if err != nil {
		cmd.Process.Kill()
		return nil, nil, err
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "lazybd")
	cleanup := func() error {
		sn.Close()
		conn.Close()
		cmd.Process.Signal(syscall.SIGTERM)
		err := cmd.Wait()
		os.RemoveAll(sockDir)
		log.Close()
		return err
	}
	return sn, cleanup, nil
}

func TestLazybdSnapshotter(t *testing.T) {
	testsuite.SnapshotterSuite(t, "lazybd", newSnapshotter)
}
