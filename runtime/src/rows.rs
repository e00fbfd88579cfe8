//! The rows of a program call, and picking rows out of row-major logits.
//!
//! A call is a list of rows, each `(slot, token, position)`: the KV-cache slot (which
//! sequence's cache the row belongs to), its token id and its absolute position there.
//! `pos_norm` writes row r's key and value at `(slots[r], positions[r])` and attention
//! reads keys `0..=positions[r]` of slot `slots[r]`, so prefill chunks and decode rows of
//! different sequences can share one call, in any order.

use crate::error::{Error, Result};

/// The rows of one program call: three arrays of one entry per row.
///
/// ```
/// use ngpt_runtime::{Error, Rows};
/// // A prefill chunk of slot 1 at positions 5..8 beside a decode row of slot 0.
/// let (tokens, positions, slots) = ([7, 8, 9, 3], [5, 6, 7, 12], [1, 1, 1, 0]);
/// let rows = Rows { tokens: &tokens, positions: &positions, slots: &slots };
/// assert_eq!(rows.check(2, 64, 100)?, 4); // 2 slots held, KV capacity 64, vocab 100
/// assert!(matches!(rows.check(1, 64, 100), Err(Error::SlotOutOfRange { row: 0, slot: 1, .. })));
/// # Ok::<(), Error>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a> {
    /// Token id per row.
    pub tokens: &'a [i32],
    /// Absolute position per row, in its slot's KV cache.
    pub positions: &'a [i32],
    /// KV-cache slot per row (below the slots the executor holds).
    pub slots: &'a [i32],
}

impl<'a> Rows<'a> {
    /// Rows of the call (the tokens' length; [`Rows::check`] holds the others to it).
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the call has no rows (which [`Rows::check`] refuses).
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Checks the rows for an executor holding `slots` KV slots of `capacity` positions
    /// and a vocabulary of `vocab` tokens, and returns their count: equal lengths, at least
    /// one row, every slot below `slots`, every position below `capacity`, every token
    /// below `vocab`, and no two rows writing the same (slot, position). Both executors
    /// check every call with this before running anything.
    pub fn check(&self, slots: usize, capacity: usize, vocab: usize) -> Result<usize> {
        let n = self.tokens.len();
        if self.positions.len() != n || self.slots.len() != n {
            return Err(Error::RowsMismatch {
                tokens: n,
                positions: self.positions.len(),
                slots: self.slots.len(),
            });
        }
        if n == 0 {
            return Err(Error::NoRows);
        }
        // Each (slot, position) a row writes: the first row writing it, by index.
        let mut writes = std::collections::HashMap::with_capacity(n);
        for r in 0..n {
            let (t, p, s) = (self.tokens[r], self.positions[r], self.slots[r]);
            let slot =
                usize::try_from(s)
                    .ok()
                    .filter(|&s| s < slots)
                    .ok_or(Error::SlotOutOfRange {
                        row: r,
                        slot: s.into(),
                        held: slots,
                    })?;
            let position = usize::try_from(p).ok().filter(|&p| p < capacity).ok_or(
                Error::PositionOutOfRange {
                    row: r,
                    position: p.into(),
                    capacity,
                },
            )?;
            if usize::try_from(t).map_or(true, |t| t >= vocab) {
                return Err(Error::TokenOutsideVocabulary {
                    token: t.into(),
                    vocab,
                });
            }
            if let Some(&first) = writes.get(&(slot, position)) {
                return Err(Error::DuplicateRow {
                    first,
                    second: r,
                    slot,
                    position,
                });
            }
            writes.insert((slot, position), r);
        }
        Ok(n)
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_rows_are_refused_with_their_own_error() {
        let ok = Rows {
            tokens: &[1, 2, 3],
            positions: &[0, 1, 0],
            slots: &[0, 0, 1],
        };
        assert_eq!(ok.check(2, 8, 4).expect("valid rows"), 3);
        let check = |t: &[i32], p: &[i32], s: &[i32]| {
            Rows {
                tokens: t,
                positions: p,
                slots: s,
            }
            .check(2, 8, 4)
            .expect_err("invalid rows")
        };
        assert!(matches!(check(&[], &[], &[]), Error::NoRows));
        assert!(matches!(
            check(&[1, 2], &[0, 1], &[0]),
            Error::RowsMismatch {
                tokens: 2,
                positions: 2,
                slots: 1
            }
        ));
        assert!(matches!(
            check(&[1, 2], &[0, 1], &[0, 2]),
            Error::SlotOutOfRange {
                row: 1,
                slot: 2,
                held: 2
            }
        ));
        assert!(matches!(
            check(&[1], &[0], &[-1]),
            Error::SlotOutOfRange { slot: -1, .. }
        ));
        assert!(matches!(
            check(&[1], &[8], &[0]),
            Error::PositionOutOfRange {
                position: 8,
                capacity: 8,
                ..
            }
        ));
        assert!(matches!(
            check(&[1], &[-3], &[0]),
            Error::PositionOutOfRange { position: -3, .. }
        ));
        assert!(matches!(
            check(&[4], &[0], &[0]),
            Error::TokenOutsideVocabulary { token: 4, vocab: 4 }
        ));
        let dup = check(&[1, 2, 3], &[3, 4, 3], &[1, 0, 1]);
        assert!(matches!(
            dup,
            Error::DuplicateRow {
                first: 0,
                second: 2,
                slot: 1,
                position: 3
            }
        ));
        assert!(!dup.to_string().contains('\n'));
    }
}
