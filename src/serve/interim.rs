//! INTERIM, until the runtime's executors take (slot, token, position) rows: an engine
//! [`Backend`] over one batch-1 CPU [`Session`] per slot. A prompt is prefilled whole (with
//! `Session::prefill_last`, as `ngpt generate` does) once its last chunk comes, so its
//! tokens are `ngpt generate`'s; decode rows go one by one. Slow, correct, and replaced by
//! `Engine::cpu` / `Engine::cuda` when those land.

use std::sync::Arc;

use ngpt_runtime::engine::{Backend, StepRows};
use ngpt_runtime::plan::LoadedPlan;
use ngpt_runtime::session::Session;
use ngpt_runtime::{Error, Result};

pub struct SessionSlots {
    sessions: Vec<Session>,
    /// Each slot's tokens so far.
    hist: Vec<Vec<u32>>,
    vocab: usize,
    capacity: usize,
}

impl SessionSlots {
    pub fn new(plan: Arc<LoadedPlan>, slots: usize) -> Result<SessionSlots> {
        let vocab = plan.dims().vocab;
        let capacity = plan.dims().max_seq_len;
        let sessions = (0..slots)
            .map(|_| Session::new(Arc::clone(&plan), 1))
            .collect::<Result<Vec<_>>>()?;
        Ok(SessionSlots {
            sessions,
            hist: vec![vec![]; slots],
            vocab,
            capacity,
        })
    }
}

fn bad(problem: String) -> Error {
    Error::Request {
        what: "step".into(),
        problem,
    }
}

impl Backend for SessionSlots {
    fn vocab(&self) -> usize {
        self.vocab
    }
    fn capacity(&self) -> usize {
        self.capacity
    }
    fn slots(&self) -> usize {
        self.sessions.len()
    }
    fn describe(&self) -> String {
        format!(
            "plan-cpu, {} batch-1 sessions (interim)",
            self.sessions.len()
        )
    }
    fn mixes_rows(&self) -> bool {
        false
    }

    fn run(&mut self, decode: bool, rows: &StepRows, chosen: &[usize]) -> Result<Vec<f32>> {
        let n = rows.len();
        let mut logits: Vec<Option<Vec<f32>>> = vec![None; n];
        let mut i = 0;
        while i < n {
            let slot = rows.slots[i] as usize;
            let mut j = i + 1;
            while !decode && j < n && rows.slots[j] as usize == slot {
                j += 1;
            }
            let pos = rows.positions[i] as usize;
            let hist = self
                .hist
                .get_mut(slot)
                .ok_or_else(|| bad(format!("slot {slot} out of range")))?;
            if pos > hist.len() {
                return Err(bad(format!("slot {slot}: position {pos} skips tokens")));
            }
            hist.truncate(pos);
            hist.extend(rows.tokens[i..j].iter().map(|&t| t as u32));
            let session = &mut self.sessions[slot];
            if decode {
                if pos == 0 {
                    return Err(bad(format!("slot {slot}: decode without prefill")));
                }
                logits[i] = Some(session.decode(&[rows.tokens[i] as u32])?);
            } else if chosen.iter().any(|&c| (i..j).contains(&c)) {
                logits[j - 1] = Some(session.prefill_last(std::slice::from_ref(hist))?);
            }
            i = j;
        }
        let mut out = Vec::with_capacity(chosen.len() * self.vocab);
        for &c in chosen {
            match logits.get(c).and_then(Option::as_ref) {
                Some(l) => out.extend_from_slice(l),
                None => return Err(bad(format!("row {c}: logits of a row mid-prompt"))),
            }
        }
        Ok(out)
    }
}
