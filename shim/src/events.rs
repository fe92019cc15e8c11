//! Publishing task events to containerd (`Events/Forward` on its ttrpc
//! socket). Publishing never fails a request: the crate's publisher queues,
//! retries and reconnects (containerd may be restarting); a drop is logged.

use containerd_shim::{event::Event, publisher::RemotePublisher};
use containerd_shim_protos::ttrpc::context::Context;
use log::warn;

pub struct Events {
    publisher: RemotePublisher,
    namespace: String,
}

impl Events {
    pub fn new(publisher: RemotePublisher, namespace: &str) -> Self {
        Self {
            publisher,
            namespace: namespace.to_string(),
        }
    }

    /// Queues `event`; the queue keeps the order events are sent in.
    pub async fn send(&self, event: impl Event + 'static) {
        let topic = event.topic();
        if let Err(e) = self
            .publisher
            .publish(Context::default(), &topic, &self.namespace, Box::new(event))
            .await
        {
            warn!("publish {topic} failed: {e}");
        }
    }
}
