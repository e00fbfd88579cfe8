//! Row selection over row-major logits, shared by the session's default `run_rows` and
//! the CPU executor's narrowed one (both sit above this module).

use crate::error::{Error, Result};

/// Rows `rows` of a row-major `[_, width]` array, in that order.
pub(crate) fn gather_rows(all: &[f32], width: usize, rows: &[usize]) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(rows.len() * width);
    for &r in rows {
        let row = all
            .get(r * width..(r + 1) * width)
            .ok_or_else(|| Error::Request {
                what: "rows".into(),
                problem: format!(
                    "row {r} is outside the {} rows computed",
                    all.len() / width.max(1)
                ),
            })?;
        out.extend_from_slice(row);
    }
    Ok(out)
}
