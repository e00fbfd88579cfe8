//! How much more memory this process can allocate, for the checks that refuse a request
//! before an allocation would fail (Rust aborts the process when one does).

/// More memory asked for than this process can still allocate: "`what` needs about N GB
/// (`detail`), more than the M GB this process can still allocate", then a hint if any.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "{what} needs about {:.1} GB ({detail}), more than the {:.1} GB this process can still allocate{}{hint}",
    .need / 1e9,
    *.free as f64 / 1e9,
    if .hint.is_empty() { "" } else { "; " }
)]
pub struct Insufficient {
    /// What needs the memory.
    pub what: String,
    /// Bytes needed.
    pub need: f64,
    /// What the bytes are for.
    pub detail: String,
    /// Bytes this process can still allocate.
    pub free: u64,
    /// What the user can do instead ("" for nothing).
    pub hint: String,
}

/// Fails with [`Insufficient`] when `need` bytes exceed [`available_bytes`]. Where nothing
/// can be read, passes.
pub fn ensure_fits(need: f64, what: &str, detail: &str, hint: &str) -> Result<(), Insufficient> {
    let Some(free) = available_bytes() else {
        return Ok(());
    };
    if need <= free as f64 {
        return Ok(());
    }
    Err(Insufficient {
        what: what.to_string(),
        need,
        detail: detail.to_string(),
        free,
        hint: hint.to_string(),
    })
}

/// Bytes a position-table element takes at a compile's peak: the f64 table and the f32 copy
/// each emitter writes (measured 17 on nv-tiny at 1,000,000 rows, RELIABILITY.md).
const TABLE_ELEMENT_BYTES: f64 = 24.0;

/// Refuses, before anything is allocated, a position table of `rows` x `head_dim` larger
/// than the memory this process can still get.
pub fn ensure_table_fits(what: &str, rows: usize, head_dim: usize) -> Result<(), Insufficient> {
    ensure_fits(
        rows as f64 * head_dim as f64 * TABLE_ELEMENT_BYTES,
        what,
        &format!("for the position table, {rows} x {head_dim} values"),
        "",
    )
}

/// The smaller of the system's available memory (`MemAvailable` in /proc/meminfo) and what
/// is left of this process's address-space limit (`ulimit -v`), in bytes; `None` where
/// neither can be read (not Linux).
pub fn available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
    let available = meminfo
        .as_deref()
        .and_then(|m| field_kib(m, "MemAvailable:"));
    let limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| address_space_limit(&l));
    let used = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| field_kib(&s, "VmSize:"));
    let left = match (limit, used) {
        (Some(limit), Some(used)) => Some(limit.saturating_sub(used)),
        _ => None,
    };
    match (available, left) {
        (Some(a), Some(l)) => Some(a.min(l)),
        (a, l) => a.or(l),
    }
}

/// A `Name:   1234 kB` line of /proc/meminfo or /proc/self/status, in bytes.
fn field_kib(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line[name.len()..].split_whitespace().next()?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The soft "Max address space" of /proc/self/limits in bytes (`None` when unlimited).
fn address_space_limit(limits: &str) -> Option<u64> {
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max address space"))?;
    line["Max address space".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insufficient_memory_names_what_and_how_much() {
        let e = Insufficient {
            what: "--max-batch 64".into(),
            need: 3.2e9,
            detail: "KV caches".into(),
            free: 1_500_000_000,
            hint: "try --max-batch 16".into(),
        };
        assert_eq!(
            e.to_string(),
            "--max-batch 64 needs about 3.2 GB (KV caches), more than the 1.5 GB this process \
             can still allocate; try --max-batch 16"
        );
        assert!(ensure_fits(f64::MAX, "x", "y", "").is_err() || available_bytes().is_none());
        assert!(ensure_fits(0.0, "x", "y", "").is_ok());
    }

    #[test]
    fn reads_proc_fields_and_limits() {
        let meminfo = "MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(field_kib(meminfo, "MemAvailable:"), Some(20_000_000 * 1024));
        assert_eq!(field_kib(meminfo, "VmSize:"), None);
        let limited = "Limit                     Soft Limit           Hard Limit           Units\n\
                       Max address space         4000000000           unlimited            bytes\n";
        assert_eq!(address_space_limit(limited), Some(4_000_000_000));
        let unlimited =
            "Max address space         unlimited            unlimited            bytes\n";
        assert_eq!(address_space_limit(unlimited), None);
    }
}
