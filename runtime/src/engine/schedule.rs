//! One step's work: which rows run, in which executor calls, and whose logits come back.

use crate::error::Result;

/// What the engine needs of an executor: run rows that each carry their (slot, token,
/// position) and return the logits of the chosen rows.
pub trait Backend: Send {
    /// Logits per row; token ids stay below it.
    fn vocab(&self) -> usize;
    /// Tokens a slot holds.
    fn capacity(&self) -> usize;
    /// KV-cache slots.
    fn slots(&self) -> usize;
    /// One line naming the executor.
    fn describe(&self) -> String;
    /// Whether decode rows and prompt rows may share a call (the CPU: one pass over the
    /// weights for both). Where not (CUDA: decode runs a fixed-shape program, captured
    /// once), the engine gives decode rows calls of their own.
    fn mixes_rows(&self) -> bool;
    /// Runs `rows` (`decode`: each row is a sequence's next token) and returns the logits
    /// of the rows `chosen` indexes, `[chosen.len(), vocab]`, in that order.
    fn run(&mut self, decode: bool, rows: &StepRows, chosen: &[usize]) -> Result<Vec<f32>>;
}

/// The rows of one executor call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepRows {
    /// Each row's token id.
    pub tokens: Vec<i32>,
    /// Each row's absolute position in its sequence.
    pub positions: Vec<i32>,
    /// Each row's KV-cache slot.
    pub slots: Vec<i32>,
}

impl StepRows {
    fn push(&mut self, slot: usize, token: u32, position: usize) {
        self.slots.push(slot as i32);
        self.tokens.push(token as i32);
        self.positions.push(position as i32);
    }

    /// Rows in the call.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the call has no rows.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// A running sequence as the planner sees it.
pub(crate) struct SeqView<'a> {
    pub(crate) slot: usize,
    pub(crate) prompt: &'a [u32],
    pub(crate) prefilled: usize,
    pub(crate) emitted: usize,
    pub(crate) last: Option<u32>,
}

/// One executor call.
#[derive(Debug)]
pub(crate) struct Call {
    pub(crate) decode: bool,
    pub(crate) rows: StepRows,
    /// Rows whose logits come back.
    pub(crate) chosen: Vec<usize>,
    /// The sequence (index into the running list) of each chosen row.
    pub(crate) chosen_seq: Vec<usize>,
    /// Every sequence with a row in the call.
    pub(crate) seqs: Vec<usize>,
}

/// A step: its calls, and how many prompt rows each sequence gets into the cache.
#[derive(Debug)]
pub(crate) struct StepPlan {
    pub(crate) calls: Vec<Call>,
    pub(crate) prefill: Vec<(usize, usize)>,
}

struct Row {
    seq: usize,
    slot: usize,
    token: u32,
    position: usize,
    chosen: bool,
    decode: bool,
}

/// Plans a step: a decode row for every sequence whose prompt is in the cache (its last
/// token at the next position), then prompt rows in admission order, at most `chunk` per
/// sequence and `prefill_budget` in all (at least one row, so prompts always progress);
/// the last row of a prompt is chosen (its logits give the first token). Rows are cut
/// into calls of at most `call_rows`, in order, so a row's keys are written by its own
/// call or an earlier one; with `mix` false decode rows and prompt rows never share one.
pub(crate) fn plan_step<'a>(
    seqs: impl Iterator<Item = SeqView<'a>>,
    prefill_budget: usize,
    chunk: usize,
    call_rows: usize,
    mix: bool,
) -> StepPlan {
    let seqs: Vec<SeqView<'a>> = seqs.collect();
    let mut decode = vec![];
    let mut prompt = vec![];
    let mut prefill = vec![];
    for (i, s) in seqs.iter().enumerate() {
        if let Some(last) = s.last {
            decode.push(Row {
                seq: i,
                slot: s.slot,
                token: last,
                position: s.prompt.len() + s.emitted - 1,
                chosen: true,
                decode: true,
            });
        }
    }
    // Where rows mix, prompt rows take the room the decode rows leave in their last call,
    // so a step costs the calls its decode rows need and no more (the running sequences'
    // next token is not delayed by an extra call); at least one chunk always runs.
    let call_rows = call_rows.max(1);
    let mut budget = if mix && !decode.is_empty() {
        prefill_budget.min((call_rows - decode.len() % call_rows) % call_rows)
    } else {
        prefill_budget
    };
    for (i, s) in seqs.iter().enumerate() {
        let left = s.prompt.len() - s.prefilled;
        if s.last.is_some() || left == 0 {
            continue;
        }
        let room = if prefill.is_empty() && budget == 0 {
            chunk
        } else {
            budget
        };
        let n = left.min(chunk).min(room);
        if n == 0 {
            continue;
        }
        budget = budget.saturating_sub(n);
        for p in s.prefilled..s.prefilled + n {
            prompt.push(Row {
                seq: i,
                slot: s.slot,
                token: s.prompt[p],
                position: p,
                chosen: p + 1 == s.prompt.len(),
                decode: false,
            });
        }
        prefill.push((i, n));
    }
    let mut calls = vec![];
    let groups: Vec<Vec<Row>> = if mix {
        vec![decode.into_iter().chain(prompt).collect()]
    } else {
        vec![decode, prompt]
    };
    for group in groups {
        let mut rows = group.into_iter().peekable();
        while rows.peek().is_some() {
            let mut call = Call {
                decode: true,
                rows: StepRows::default(),
                chosen: vec![],
                chosen_seq: vec![],
                seqs: vec![],
            };
            for r in rows.by_ref().take(call_rows) {
                if r.chosen {
                    call.chosen.push(call.rows.len());
                    call.chosen_seq.push(r.seq);
                }
                if !call.seqs.contains(&r.seq) {
                    call.seqs.push(r.seq);
                }
                call.decode &= r.decode;
                call.rows.push(r.slot, r.token, r.position);
            }
            calls.push(call);
        }
    }
    StepPlan { calls, prefill }
}
