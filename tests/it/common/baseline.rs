//! Measured-error baselines: a parity test's relative error may exceed neither the absolute
//! limit the test states nor `FACTOR` times the error measured for its key when the
//! baselines in `tests/fixtures/baselines.json` were recorded.
//!
//! Keys read `suite/what/model/engine/dtype`; the last part picks the floor a baseline of 0
//! (bitwise-equal paths) is raised to, so that a tiny nonzero error is not a failure.
//! Recording: with `NGPT_BASELINE_RECORD=FILE` set, every call appends `key<TAB>measured`
//! to FILE and checks the absolute limit only; `scripts/baselines.py FILE` then writes the
//! largest value of each key into the fixture.
//!
//! Shared by `tests/it` and `compiler/tests/it` (included there by path): std and
//! serde_json only.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Mutex, OnceLock};

/// How far above its baseline a measured error may go.
pub const FACTOR: f64 = 3.0;
/// The smallest baseline an f64 key is held to.
pub const FLOOR_F64: f64 = 1e-15;
/// The smallest baseline any other key (f32 activations, bf16 or f16 weights) is held to.
pub const FLOOR_F32: f64 = 1e-9;

const FIXTURE: &str = include_str!("../../fixtures/baselines.json");

fn recorded() -> &'static BTreeMap<String, f64> {
    static MAP: OnceLock<BTreeMap<String, f64>> = OnceLock::new();
    MAP.get_or_init(|| {
        let v: serde_json::Value =
            serde_json::from_str(FIXTURE).expect("tests/fixtures/baselines.json is not JSON");
        let map = v["baselines"]
            .as_object()
            .expect("tests/fixtures/baselines.json has no \"baselines\" object");
        map.iter()
            .map(|(k, x)| {
                let x = x
                    .as_f64()
                    .unwrap_or_else(|| panic!("baseline {k}: {x} is not a number"));
                (k.clone(), x)
            })
            .collect()
    })
}

/// The floor of `key`'s baseline: by its last part, the dtype.
pub fn floor_for(key: &str) -> f64 {
    if key.ends_with("/f64") {
        FLOOR_F64
    } else {
        FLOOR_F32
    }
}

/// What `key` may reach: `FACTOR x max(baseline, floor)`, or `None` without a baseline.
pub fn bound(key: &str, baseline: Option<f64>) -> Option<f64> {
    baseline.map(|b| FACTOR * b.max(floor_for(key)))
}

/// Panics unless `measured <= absolute_limit` and, where `key` has a recorded baseline,
/// `measured <= FACTOR x max(baseline, floor)`. A key without a baseline fails under CI
/// (`CI` set) and is noted elsewhere (a GPU run measuring an engine CI cannot run).
pub fn assert_within_baseline(key: &str, measured: f64, absolute_limit: f64) {
    if let Some(path) = std::env::var_os("NGPT_BASELINE_RECORD") {
        record(&path, key, measured);
        check(key, measured, absolute_limit, None);
        return;
    }
    let baseline = recorded().get(key).copied();
    if baseline.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{key}: no baseline in tests/fixtures/baselines.json (measured {measured:e}, \
             limit {absolute_limit:e})"
        );
        eprintln!(
            "note: {key}: no recorded baseline; measured {measured:e}, limit {absolute_limit:e}"
        );
    }
    check(key, measured, absolute_limit, baseline);
}

/// The rule itself, with the baseline given: what [`assert_within_baseline`] applies.
pub fn check(key: &str, measured: f64, absolute_limit: f64, baseline: Option<f64>) {
    let shown = baseline.map_or("none".to_string(), |b| format!("{b:e}"));
    // NaN fails both comparisons.
    assert!(
        measured <= absolute_limit,
        "{key}: relative error {measured:e} above the limit {absolute_limit:e} \
         (baseline {shown})"
    );
    if let Some(bound) = bound(key, baseline) {
        assert!(
            measured <= bound,
            "{key}: relative error {measured:e} above {FACTOR} x its baseline {shown} \
             (= {bound:e}, floor {:e}; limit {absolute_limit:e})",
            floor_for(key)
        );
    }
}

fn record(path: &std::ffi::OsStr, key: &str, measured: f64) {
    static LOCK: Mutex<()> = Mutex::new(());
    let _held = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("NGPT_BASELINE_RECORD: cannot open the file");
    writeln!(f, "{key}\t{measured:e}").expect("NGPT_BASELINE_RECORD: cannot write");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fails(f: impl FnOnce() + std::panic::UnwindSafe) -> Option<String> {
        std::panic::catch_unwind(f).err().map(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        })
    }

    #[test]
    fn four_times_the_baseline_fails_and_names_key_value_baseline_and_limit() {
        let (key, base) = ("unit/synthetic/m/plan-cpu/f32", 2.5e-7);
        check(key, base, 1e-5, Some(base));
        check(key, 3.0 * base, 1e-5, Some(base));
        let msg = fails(|| check(key, 4.0 * base, 1e-5, Some(base))).expect("4x passed");
        for part in [key, "1e-6", "2.5e-7", "1e-5"] {
            assert!(msg.contains(part), "{part} not in: {msg}");
        }
        // The absolute limit stays the outer bound, whatever the baseline says.
        assert!(fails(|| check(key, 2e-5, 1e-5, Some(1e-5))).is_some());
        assert!(fails(|| check(key, f64::NAN, 1e-5, Some(base))).is_some());
    }

    #[test]
    fn a_zero_baseline_is_raised_to_the_floor_of_its_dtype() {
        let f32_key = "unit/synthetic/m/ir/f32";
        let f64_key = "unit/synthetic/m/ir/f64";
        check(f32_key, 2e-9, 1e-5, Some(0.0));
        check(f64_key, 2e-15, 1e-12, Some(0.0));
        assert!(fails(|| check(f32_key, 4e-9, 1e-5, Some(0.0))).is_some());
        assert!(fails(|| check(f64_key, 4e-15, 1e-12, Some(0.0))).is_some());
    }
}
