//! Moving the ENI between the host and a pod netns without ever giving it a
//! name another device can hold.
//!
//! Invariant: whenever the ENI is in the host netns because of this plugin,
//! it is named `Mac::parking_name()` (`eni` + 12 hex digits). That name is
//! unique per MAC, so no other NIC can hold it, and moving the ENI home can
//! never collide with the `ethN` the kernel or udev has meanwhile given to a
//! newly hot-plugged NIC. All renames happen inside the pod netns (which is
//! private to us at that moment) or in the same RTM_SETLINK as the move.

use crate::error::{CniError, Result};
use crate::link::{Link, Netlink};
use crate::log;
use crate::mac::Mac;
use crate::netns::Netns;

/// The two ends of a move and how to recognise the ENI in them.
pub struct Ends<'a> {
    pub host: &'a Netns,
    pub host_nl: &'a Netlink,
    pub pod: &'a Netns,
    pub pod_nl: &'a Netlink,
    pub mac: Mac,
    pub stand_in_kinds: &'a [String],
}

impl Ends<'_> {
    async fn find_in_pod(&self) -> Result<Option<Link>> {
        self.pod_nl.find_eni(self.mac, self.stand_in_kinds).await
    }

    /// ADD: host -> pod, named `ifname` there. The ENI travels under its
    /// parking name and takes `ifname` only inside the pod. If a step fails,
    /// the steps before it are undone, which leaves the ENI parked in the host.
    pub async fn move_in(&self, eni: &Link, ifname: &str) -> Result<Link> {
        let parking = self.mac.parking_name();
        self.host_nl.set_up(eni, false).await?;
        if let Err(e) = self.host_nl.move_to(eni, self.pod, &parking).await {
            // The kernel may have moved it and failed afterwards; look.
            self.undo_move_in(&parking).await;
            return Err(e);
        }
        let Some(in_pod) = self.find_in_pod().await? else {
            return Err(CniError::TryAgainLater(format!(
                "ENI {} vanished while moving it into {}",
                self.mac,
                self.pod.path().display()
            )));
        };
        if let Err(e) = self.pod_nl.rename(&in_pod, ifname).await {
            self.undo_move_in(&parking).await;
            return Err(match e.errno() {
                Some(nix::libc::EEXIST) => CniError::InterfaceExists(ifname.to_string()),
                _ => e,
            });
        }
        Ok(Link {
            name: ifname.to_string(),
            ..in_pod
        })
    }

    /// Best effort: puts the ENI back in the host if it is in the pod. Any
    /// failure is logged; the ENI then stays findable by MAC for DEL/GC.
    async fn undo_move_in(&self, parking: &str) {
        match self.find_in_pod().await {
            Ok(Some(l)) => {
                if let Err(e) = self.park_link(&l).await {
                    log(format!(
                        "undo: could not move ENI {} back to the host: {e}",
                        self.mac
                    ));
                }
            }
            Ok(None) => {}
            Err(e) => log(format!(
                "undo: looking for {parking} in the pod failed: {e}"
            )),
        }
    }

    /// DEL: pod -> host under the parking name. Ok(false) if the ENI is not
    /// in the pod netns (already home, or gone with the namespace).
    pub async fn park(&self) -> Result<bool> {
        match self.find_in_pod().await? {
            Some(l) => self.park_link(&l).await.map(|()| true),
            None => Ok(false),
        }
    }

    /// Down, rename to the parking name inside the pod, then move (keeping
    /// the name). The name is unique per MAC, so the move cannot collide.
    async fn park_link(&self, l: &Link) -> Result<()> {
        let parking = self.mac.parking_name();
        self.pod_nl.set_up(l, false).await?;
        let l = if l.name != parking {
            self.pod_nl.rename(l, &parking).await?;
            Link {
                name: parking.clone(),
                ..l.clone()
            }
        } else {
            l.clone()
        };
        self.pod_nl.move_to(&l, self.host, &parking).await
    }
}

/// An ENI that is already in the host netns but not under its parking name
/// (the kernel returned it from a destroyed pod netns as `devN` or under its
/// pod name, or an interrupted ADD left it under its udev name) is renamed
/// to the parking name. Returns the link as it is now, if present.
pub async fn rehome(
    host_nl: &Netlink,
    mac: Mac,
    stand_in_kinds: &[String],
) -> Result<Option<Link>> {
    let Some(l) = host_nl.find_eni(mac, stand_in_kinds).await? else {
        return Ok(None);
    };
    let parking = mac.parking_name();
    if l.name == parking {
        return Ok(Some(l));
    }
    log(format!(
        "ENI {mac} is in the host as {}; renaming it to {parking}",
        l.name
    ));
    if let Err(e) = host_nl.rename(&l, &parking).await {
        // Kernels before 6.2 refuse to rename an up link (EBUSY).
        if e.errno() != Some(nix::libc::EBUSY) {
            return Err(e);
        }
        host_nl.set_up(&l, false).await?;
        host_nl.rename(&l, &parking).await?;
    }
    Ok(Some(Link { name: parking, ..l }))
}
