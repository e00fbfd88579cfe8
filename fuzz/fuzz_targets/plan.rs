//! `model.plan` + `model.weights` through `ngpt_runtime::plan::LoadedPlan::from_bytes` and
//! `from_vec` (a copy and the weights in place, which must agree), and
//! whatever loads through a ragged prefill and two decode steps on the CPU executor: an
//! error or logits of the right size, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ngpt_fuzz::PlanOutcome;

fuzz_target!(|data: &[u8]| {
    if let PlanOutcome::Broken(what) = ngpt_fuzz::plan(data) {
        panic!("{what}");
    }
});
