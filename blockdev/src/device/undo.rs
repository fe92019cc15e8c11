//! Rollback for multi-step setup: each step registers how to undo itself; if
//! the setup does not finish, the undos run in reverse order.

type Step = (&'static str, Box<dyn FnOnce() + Send>);

pub struct Undo {
    steps: Vec<Step>,
}

impl Undo {
    pub fn new() -> Self {
        Undo { steps: Vec::new() }
    }

    pub fn push(&mut self, what: &'static str, undo: impl FnOnce() + Send + 'static) {
        self.steps.push((what, Box::new(undo)));
    }

    /// The setup finished: keep everything.
    pub fn commit(mut self) {
        self.steps.clear();
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        while let Some((what, undo)) = self.steps.pop() {
            tracing::debug!("rolling back: {what}");
            undo();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn undoes_in_reverse_unless_committed() {
        let log = Arc::new(Mutex::new(Vec::new()));
        {
            let mut undo = Undo::new();
            for i in 0..3 {
                let log = log.clone();
                undo.push("step", move || log.lock().unwrap().push(i));
            }
        }
        assert_eq!(*log.lock().unwrap(), [2, 1, 0]);
        let mut undo = Undo::new();
        let l = log.clone();
        undo.push("step", move || l.lock().unwrap().push(9));
        undo.commit();
        assert_eq!(log.lock().unwrap().len(), 3);
    }
}
