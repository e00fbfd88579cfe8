//! Checks on a `ckpt.pt`'s pickle before candle-core reads it.
//!
//! candle's pickle reader trusts its input, and `fuzz/` (target `import_torch`) found where:
//! - it allocates a string's 4-byte length before reading it (a few bytes ask for 4 GiB);
//! - it shifts each byte of a LONG1 integer into an i64, so a 9-byte one overflows;
//! - a tensor record's storage offset is multiplied by the element size unchecked;
//! - a record with too short an argument tuple makes it index past the tuple's end;
//! - a memo get clones a whole object, so a few hundred bytes of gets and puts can ask for
//!   exponential memory (found by reading the reader, not by the fuzzer);
//! - a record it cannot read is skipped with a `skipping: ...` line on stderr.
//!
//! Overflows panic in builds with overflow checks (tests, the debug binary) and wrap in
//! release builds. These checks refuse such a pickle with an error first. They walk the
//! same bytes candle will read, with the same opcodes, but keep only sizes; a pickle the
//! walk cannot follow to its STOP is refused as well (candle would fail on it too).

use candle_core::pickle::Object;

/// Opcodes candle reads (`candle_core::pickle::OpCode`), by byte.
mod op {
    pub const PROTO: u8 = 0x80;
    pub const GLOBAL: u8 = b'c';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const REDUCE: u8 = b'R';
    pub const MARK: u8 = b'(';
    pub const BINUNICODE: u8 = b'X';
    pub const BININT: u8 = b'J';
    pub const TUPLE: u8 = b't';
    pub const BINPERSID: u8 = b'Q';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const NONE: u8 = b'N';
    pub const BINGET: u8 = b'h';
    pub const LONG_BINGET: u8 = b'j';
    pub const SETITEM: u8 = b's';
    pub const SETITEMS: u8 = b'u';
    pub const EMPTY_DICT: u8 = b'}';
    pub const DICT: u8 = b'd';
    pub const BUILD: u8 = b'b';
    pub const STOP: u8 = b'.';
    pub const NEWOBJ: u8 = 0x81;
    pub const EMPTY_LIST: u8 = b']';
    pub const BINFLOAT: u8 = b'G';
    pub const APPEND: u8 = b'a';
    pub const APPENDS: u8 = b'e';
    pub const LONG1: u8 = 0x8a;
}

/// One stack entry of the walk: a mark, or an object's size (nodes plus string bytes).
#[derive(Clone, Copy)]
enum Item {
    Mark,
    Obj(u64),
}

struct Walk<'a> {
    bytes: &'a [u8],
    pos: usize,
    stack: Vec<Item>,
    memo: std::collections::HashMap<u32, u64>,
    /// Object sizes candle would clone (memo puts and gets) so far, and the limit.
    cloned: u64,
    budget: u64,
}

/// A walk ends at STOP or at the first problem: a pickle the walk cannot follow is refused
/// too (candle would fail on it as well), so nothing the walk has not checked reaches candle.
type Step<T> = std::result::Result<T, String>;

impl Walk<'_> {
    fn take(&mut self, n: usize) -> Step<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end
            .ok_or_else(|| format!("unexpected end of the pickle at byte {}", self.bytes.len()))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    fn u32(&mut self) -> Step<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn line(&mut self) -> usize {
        let rest = &self.bytes[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .map_or(rest.len(), |i| i + 1);
        self.pos += n;
        n
    }
    fn push(&mut self, size: u64) -> Step<()> {
        if size > self.budget {
            return Err(format!(
                "an object of {size} nodes and bytes, more than the {} this pickle's length allows",
                self.budget
            ));
        }
        self.stack.push(Item::Obj(size));
        Ok(())
    }
    fn pop(&mut self) -> Step<u64> {
        match self.stack.pop() {
            Some(Item::Obj(s)) => Ok(s),
            Some(Item::Mark) => Ok(1),
            None => Err(format!("unexpected empty stack at byte {}", self.pos)),
        }
    }
    fn pop_to_mark(&mut self) -> Step<u64> {
        let at = self.stack.iter().rposition(|i| matches!(i, Item::Mark));
        let at = at.ok_or_else(|| format!("marker object not found at byte {}", self.pos))?;
        let sum = self.stack[at + 1..]
            .iter()
            .map(|i| match i {
                Item::Obj(s) => *s,
                Item::Mark => 1,
            })
            .fold(0u64, u64::saturating_add);
        self.stack.truncate(at);
        Ok(sum)
    }
    fn grow_last(&mut self, by: u64) -> Step<()> {
        let size = match self.stack.last() {
            Some(Item::Obj(s)) => s.saturating_add(by),
            _ => return Err(format!("nothing to add items to at byte {}", self.pos)),
        };
        self.pop()?;
        self.push(size)
    }
    fn clone_cost(&mut self, size: u64) -> Step<()> {
        self.cloned = self.cloned.saturating_add(size);
        if self.cloned > self.budget {
            return Err(format!(
                "its memo would copy {} nodes and bytes, more than the {} its length allows",
                self.cloned, self.budget
            ));
        }
        Ok(())
    }

    fn run(&mut self) -> Step<()> {
        loop {
            let code = self.take(1)?[0];
            match code {
                op::PROTO => {
                    self.take(1)?;
                }
                op::GLOBAL => {
                    let n = self.line() + self.line();
                    self.push(1 + n as u64)?;
                }
                op::BININT1 => {
                    self.take(1)?;
                    self.push(1)?;
                }
                op::BININT2 => {
                    self.take(2)?;
                    self.push(1)?;
                }
                op::BININT => {
                    self.take(4)?;
                    self.push(1)?;
                }
                op::BINFLOAT => {
                    self.take(8)?;
                    self.push(1)?;
                }
                op::BINUNICODE => {
                    let at = self.pos - 1;
                    let len = self.u32()? as usize;
                    let left = self.bytes.len() - self.pos;
                    if len > left {
                        return Err(format!(
                            "the string at byte {at} claims {len} bytes; {left} remain"
                        ));
                    }
                    self.take(len)?;
                    self.push(1 + len as u64)?;
                }
                op::LONG1 => {
                    let n = self.take(1)?[0] as usize;
                    if n > 8 {
                        // candle shifts each byte into an i64: a ninth overflows.
                        return Err(format!(
                            "the integer at byte {} has {n} bytes; at most 8 are read",
                            self.pos - 2
                        ));
                    }
                    self.take(n)?;
                    self.push(1)?;
                }
                // candle reads DICT as EMPTY_DICT.
                op::NEWTRUE
                | op::NEWFALSE
                | op::NONE
                | op::EMPTY_TUPLE
                | op::EMPTY_LIST
                | op::EMPTY_DICT
                | op::DICT
                | op::MARK => {
                    if code == op::MARK {
                        self.stack.push(Item::Mark);
                    } else {
                        self.push(1)?;
                    }
                }
                op::BINPERSID | op::TUPLE1 => {
                    let s = self.pop()?;
                    self.push(s.saturating_add(1))?;
                }
                op::TUPLE2 | op::BUILD | op::REDUCE | op::NEWOBJ => {
                    let s = self.pop()?.saturating_add(self.pop()?);
                    self.push(s.saturating_add(1))?;
                }
                op::TUPLE3 => {
                    let s = self.pop()?.saturating_add(self.pop()?);
                    let s = s.saturating_add(self.pop()?);
                    self.push(s.saturating_add(1))?;
                }
                op::TUPLE => {
                    let s = self.pop_to_mark()?;
                    self.push(s.saturating_add(1))?;
                }
                op::APPEND => {
                    let s = self.pop()?;
                    self.grow_last(s)?;
                }
                op::SETITEM => {
                    let s = self.pop()?.saturating_add(self.pop()?);
                    self.grow_last(s)?;
                }
                op::APPENDS | op::SETITEMS => {
                    let s = self.pop_to_mark()?;
                    self.grow_last(s)?;
                }
                op::BINGET | op::LONG_BINGET => {
                    let id = if code == op::BINGET {
                        self.take(1)?[0] as u32
                    } else {
                        self.u32()?
                    };
                    let size = *self
                        .memo
                        .get(&id)
                        .ok_or_else(|| format!("missing object in memo {id}"))?;
                    self.clone_cost(size)?;
                    self.push(size)?;
                }
                op::BINPUT | op::LONG_BINPUT => {
                    let id = if code == op::BINPUT {
                        self.take(1)?[0] as u32
                    } else {
                        self.u32()?
                    };
                    let size = match self.stack.last() {
                        Some(Item::Obj(s)) => *s,
                        Some(Item::Mark) => 1,
                        None => return Err(format!("unexpected empty stack at byte {}", self.pos)),
                    };
                    self.clone_cost(size)?;
                    self.memo.insert(id, size);
                }
                op::STOP => return Ok(()),
                // An opcode candle does not know (its wording).
                other => return Err(format!("unknown op-code {other}")),
            }
        }
    }
}

/// Walks the pickle as candle will read it and refuses one that would make candle allocate
/// more than the bytes justify (a string longer than what follows it, objects built or
/// copied through the memo larger than 16 x the pickle's length + 1 Mi), overflow, or that
/// it cannot follow to its STOP.
pub fn scan(bytes: &[u8]) -> std::result::Result<(), String> {
    let mut walk = Walk {
        bytes,
        pos: 0,
        stack: vec![],
        memo: Default::default(),
        cloned: 0,
        budget: (bytes.len() as u64).saturating_mul(16) + (1 << 20),
    };
    walk.run()
}

fn tuple<'a>(o: &'a Object, len: usize, what: &str) -> std::result::Result<&'a [Object], String> {
    match o {
        Object::Tuple(t) if t.len() >= len => Ok(t),
        _ => Err(format!("{what} is not a tuple of at least {len} items")),
    }
}

fn class(o: &Object) -> Option<(&str, &str)> {
    match o {
        Object::Class {
            module_name,
            class_name,
        } => Some((module_name, class_name)),
        _ => None,
    }
}

/// Checks every tensor record of the state dict the way candle will read it (its
/// `into_tensor_info`), so candle neither panics nor skips a record with a message on
/// stderr: `_rebuild_tensor_v2(storage, offset, size, stride, ...)`, possibly inside
/// `_rebuild_parameter` or `_rebuild_from_type_v2`, with `storage` a persistent id
/// `("storage", <dtype>Storage, key, location, numel)` and `offset` within the file.
pub fn check_state_dict(model: &Object, file_len: u64) -> std::result::Result<(), String> {
    let Object::Dict(entries) = model else {
        return Ok(());
    };
    for (key, value) in entries {
        let Object::Unicode(name) = key else { continue };
        check_record(value, file_len).map_err(|p| format!("tensor `{name}`: {p}"))?;
    }
    Ok(())
}

fn check_record(value: &Object, file_len: u64) -> std::result::Result<(), String> {
    let Object::Reduce { callable, args } = value else {
        return Ok(());
    };
    let (callable, args) = match class(callable) {
        Some(("torch._tensor", "_rebuild_from_type_v2")) => {
            let t = tuple(args, 3, "the arguments of _rebuild_from_type_v2")?;
            (&t[0], &t[2])
        }
        Some(("torch._utils", "_rebuild_parameter")) => {
            let t = tuple(args, 1, "the arguments of _rebuild_parameter")?;
            match &t[0] {
                Object::Reduce { callable, args } => (&**callable, &**args),
                _ => return Err("_rebuild_parameter does not rebuild a tensor".into()),
            }
        }
        _ => (&**callable, &**args),
    };
    if class(callable) != Some(("torch._utils", "_rebuild_tensor_v2")) {
        return Ok(());
    }
    let t = tuple(args, 4, "the arguments of _rebuild_tensor_v2")?;
    for (what, dims) in [("stride", &t[3]), ("size", &t[2])] {
        match dims {
            Object::Tuple(d) if d.iter().all(|x| matches!(x, Object::Int(i) if *i >= 0)) => {}
            _ => return Err(format!("{what} is not a tuple of non-negative integers")),
        }
    }
    let offset = match &t[1] {
        Object::Int(i) => *i as i64,
        Object::Long(i) => *i,
        _ => return Err("the storage offset is not an integer".into()),
    };
    if offset < 0 || offset as u64 > file_len {
        return Err(format!(
            "storage offset {offset} is outside the {file_len}-byte file"
        ));
    }
    let Object::PersistentLoad(storage) = &t[0] else {
        return Err("the storage is not a persistent id".into());
    };
    let s = tuple(storage, 5, "the storage")?;
    if !matches!(s[4], Object::Int(_) | Object::Long(_)) || !matches!(s[2], Object::Unicode(_)) {
        return Err("the storage's key or size is malformed".into());
    }
    match class(&s[1]) {
        Some((_, "FloatStorage" | "DoubleStorage" | "HalfStorage" | "BFloat16Storage"))
        | Some((_, "ByteStorage" | "LongStorage")) => Ok(()),
        Some((_, other)) => Err(format!(
            "storage type {other} is not supported (expected FloatStorage, BFloat16Storage or HalfStorage)"
        )),
        None => Err("the storage type is not a class".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_string_longer_than_the_pickle_is_refused() {
        let mut p = vec![0x80, 2, b'X'];
        p.extend(0xbe00_0000u32.to_le_bytes());
        p.extend(b"abc.");
        let e = scan(&p).err().unwrap_or_default();
        assert!(e.contains("claims 3187671040 bytes; 4 remain"), "{e}");
        // The same string with its real length passes.
        let mut ok = vec![0x80, 2, b'X'];
        ok.extend(3u32.to_le_bytes());
        ok.extend(b"abc.");
        assert_eq!(scan(&ok), Ok(()));
    }

    #[test]
    fn what_the_walk_cannot_follow_is_refused() {
        // candle reads DICT (`d`) as EMPTY_DICT: a walk that popped to a mark instead
        // stopped here and let the 3 GB string after it through (found by the fuzzer).
        let mut p = vec![0x80, 2, b'd', b'X'];
        p.extend(0xea00_0000u32.to_le_bytes());
        p.push(b'.');
        let e = scan(&p).err().unwrap_or_default();
        assert!(e.contains("claims 3925868544 bytes"), "{e}");
        for (bad, want) in [
            (&b"\x80\x02\xff"[..], "unknown op-code 255"),
            (&b"\x80\x02t."[..], "marker object not found"),
            (&b"\x80\x02h\x07."[..], "missing object in memo 7"),
            (&b"\x80\x02\x85."[..], "unexpected empty stack"),
            (&b"\x80\x02N"[..], "unexpected end of the pickle"),
        ] {
            let e = scan(bad).err().unwrap_or_default();
            assert!(e.contains(want), "{bad:?}: {e}");
        }
    }

    #[test]
    fn a_long1_of_nine_bytes_is_refused() {
        let mut p = vec![0x80, 2, 0x8a, 9];
        p.extend([1; 9]);
        p.push(b'.');
        let e = scan(&p).err().unwrap_or_default();
        assert!(e.contains("9 bytes; at most 8"), "{e}");
        assert_eq!(
            scan(&[0x80, 2, 0x8a, 8, 1, 1, 1, 1, 1, 1, 1, 1, b'.']),
            Ok(())
        );
    }

    fn class(m: &str, c: &str) -> Object {
        Object::Class {
            module_name: m.into(),
            class_name: c.into(),
        }
    }

    /// `{"w": _rebuild_tensor_v2(args)}`.
    fn dict_of(args: Vec<Object>) -> Object {
        Object::Dict(vec![(
            Object::Unicode("w".into()),
            Object::Reduce {
                callable: Box::new(class("torch._utils", "_rebuild_tensor_v2")),
                args: Box::new(Object::Tuple(args)),
            },
        )])
    }

    fn storage(kind: &str) -> Object {
        Object::PersistentLoad(Box::new(Object::Tuple(vec![
            Object::Unicode("storage".into()),
            class("torch", kind),
            Object::Unicode("0".into()),
            Object::Unicode("cpu".into()),
            Object::Int(4),
        ])))
    }

    #[test]
    fn malformed_tensor_records_are_refused() {
        let dims = || Object::Tuple(vec![Object::Int(4)]);
        let good = vec![storage("FloatStorage"), Object::Int(0), dims(), dims()];
        assert_eq!(check_state_dict(&dict_of(good), 100), Ok(()));
        for (args, want) in [
            (
                vec![storage("FloatStorage"), Object::Int(0), dims()],
                "at least 4",
            ),
            (
                vec![
                    storage("FloatStorage"),
                    Object::Long(1 << 62),
                    dims(),
                    dims(),
                ],
                "outside the 100-byte file",
            ),
            (
                vec![storage("FloatStorage"), Object::Int(-1), dims(), dims()],
                "outside",
            ),
            (
                vec![storage("IntStorage"), Object::Int(0), dims(), dims()],
                "IntStorage is not supported",
            ),
            (
                vec![
                    storage("FloatStorage"),
                    Object::Int(0),
                    Object::None,
                    dims(),
                ],
                "size is not a tuple",
            ),
        ] {
            let e = check_state_dict(&dict_of(args), 100)
                .err()
                .unwrap_or_default();
            assert!(e.starts_with("tensor `w`: ") && e.contains(want), "{e}");
        }
        let param = Object::Dict(vec![(
            Object::Unicode("p".into()),
            Object::Reduce {
                callable: Box::new(class("torch._utils", "_rebuild_parameter")),
                args: Box::new(Object::Tuple(vec![])),
            },
        )]);
        let e = check_state_dict(&param, 100).err().unwrap_or_default();
        assert!(e.contains("_rebuild_parameter"), "{e}");
    }

    #[test]
    fn doubling_through_the_memo_is_refused() {
        // x = "a"; then 40 times: x = (x, x), each put in the memo and got twice.
        let mut p = vec![0x80, 2, b'X', 1, 0, 0, 0, b'a', b'q', 0];
        for _ in 0..40 {
            p.extend([b'h', 0, b'h', 0, 0x86, b'q', 0]);
        }
        p.push(b'.');
        let e = scan(&p).err().unwrap_or_default();
        assert!(e.contains("more than the"), "{e}");
    }
}
