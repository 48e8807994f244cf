//! The data plane's rare events (lb-ebpf's `events`: the flood guard engaging and releasing,
//! storm control dropping, an internal drop), read from its aya-log ring buffer into the
//! controller's `tracing` log with listener names for the program's ids.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex, PoisonError, RwLock},
};

/// Records kept for [`super::Dataplane::recent_events`].
const RECENT: usize = 256;

/// Where aya-log's records go: the controller's log, and a short history.
#[derive(Clone, Default)]
pub struct EventSink {
    /// Listener id to name, as the last apply wrote them.
    pub(super) names: Arc<RwLock<BTreeMap<u32, String>>>,
    pub(super) recent: Arc<Mutex<VecDeque<String>>>,
}

impl EventSink {
    /// `text` with every `listener #ID` given its name.
    fn named(&self, text: &str) -> String {
        let names = self.names.read().unwrap_or_else(PoisonError::into_inner);
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(at) = rest.find("listener #") {
            let (before, after) = rest.split_at(at);
            out.push_str(before);
            let digits: String = after["listener #".len()..].chars().take_while(char::is_ascii_digit).collect();
            match digits.parse::<u32>().ok().and_then(|id| names.get(&id)) {
                Some(name) => {
                    out.push_str("listener ");
                    out.push_str(name);
                }
                None => out.push_str(&after[..("listener #".len() + digits.len())]),
            }
            rest = &after["listener #".len() + digits.len()..];
        }
        out.push_str(rest);
        out
    }
}

impl log::Log for EventSink {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let text = self.named(&record.args().to_string());
        match record.level() {
            log::Level::Error | log::Level::Warn => tracing::warn!(target: "dsrlb::xdp", "{text}"),
            _ => tracing::info!(target: "dsrlb::xdp", "{text}"),
        }
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(text);
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::EventSink;

    #[test]
    fn listener_ids_get_their_names() {
        let sink = EventSink::default();
        sink.names.write().expect("lock").insert(3, "mqtt6".to_owned());
        assert_eq!(sink.named("storm control dropping SYNs of listener #3 above"), "storm control dropping SYNs of listener mqtt6 above");
        assert_eq!(sink.named("listener #7 and listener #3"), "listener #7 and listener mqtt6");
        assert_eq!(sink.named("no listener here"), "no listener here");
    }
}
