//! A weight's elements: viewed in place in the bytes a plan was loaded from (the
//! memory-mapped `model.weights`, or a buffer handed over whole), or owned.
//!
//! [`LoadedPlan::load`](crate::plan::LoadedPlan::load) maps `model.weights` instead of reading
//! it: loading costs no copy, the weights take no memory beyond the page cache they already
//! sit in, and processes serving the same plan share one copy.
//! [`LoadedPlan::from_vec`](crate::plan::LoadedPlan::from_vec) keeps the buffer it is given
//! and views the weights in it. The compiler aligns every tensor to 256 bytes, so on a
//! little-endian host each weight is viewed in place as `[f32]` or `[u16]`; anything else
//! (a misaligned offset in a hand-made plan, a big-endian host, borrowed bytes) is decoded
//! into an owned copy, with the same values.
//!
//! Mapping has the usual condition: the file must not be modified in place while it is
//! mapped. `ngpt compile` never does that (it writes a new directory and renames it into
//! place, so a running process keeps reading the old file); truncating the file under a
//! running process would make it fault. `NGPT_MMAP=0` reads the file instead
//! ([`crate::plan::WeightsIo`]).

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use memmap2::Mmap;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for u16 {}
    impl Sealed for u8 {}
}

/// An element type a weight can be viewed as in place: plain old data for which every bit
/// pattern is a value (`f32`, and `u16` for bf16 bits).
pub trait Element: sealed::Sealed + Copy + PartialEq + fmt::Debug + Send + Sync + 'static {
    /// Decodes one element from its little-endian bytes (`size_of::<Self>()` of them).
    fn from_le(bytes: &[u8]) -> Self;
    /// The element's bit pattern (what equality of weights compares: a NaN equals itself).
    fn bits(self) -> u32;
}

impl Element for f32 {
    fn from_le(b: &[u8]) -> f32 {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
    fn bits(self) -> u32 {
        self.to_bits()
    }
}

impl Element for u8 {
    fn from_le(b: &[u8]) -> u8 {
        b[0]
    }
    fn bits(self) -> u32 {
        self as u32
    }
}

impl Element for u16 {
    fn from_le(b: &[u8]) -> u16 {
        u16::from_le_bytes([b[0], b[1]])
    }
    fn bits(self) -> u32 {
        self as u32
    }
}

/// The elements of one weight; dereferences to `[T]`.
///
/// ```
/// use ngpt_runtime::mapped::Elems;
/// let owned: Elems<f32> = vec![1.0, -2.0].into();
/// assert_eq!(&owned[..], &[1.0, -2.0]);
/// assert!(!owned.is_in_place());
/// let decoded = Elems::<u16>::decode(&[0xc0, 0x3f, 0x00, 0xc0]); // bf16 1.5, -2.0
/// assert_eq!(&decoded[..], &[0x3fc0, 0xc000]);
/// ```
pub struct Elems<T: Element> {
    repr: Repr<T>,
}

/// Bytes weights can be viewed in: a mapped file or a buffer, never written while shared.
pub(crate) type Shared = Arc<dyn AsRef<[u8]> + Send + Sync>;

enum Repr<T> {
    Owned(Vec<T>),
    /// `len` elements at byte `start` of `bytes`; checked aligned and in bounds when made.
    InPlace {
        bytes: Shared,
        start: usize,
        len: usize,
    },
}

impl<T: Element> Elems<T> {
    /// Decodes little-endian bytes into an owned copy (a trailing partial element is
    /// dropped).
    pub fn decode(raw: &[u8]) -> Elems<T> {
        let size = std::mem::size_of::<T>();
        Vec::from_iter(raw.chunks_exact(size).map(T::from_le)).into()
    }

    /// The `len` elements at byte `start` of `shared`: viewed in place when they lie inside
    /// it, aligned for `T`, on a little-endian host; decoded into a copy otherwise (and
    /// empty if they are out of bounds, which the plan's validation rules out first).
    pub(crate) fn in_place(shared: &Shared, start: usize, len: usize) -> Elems<T> {
        let size = std::mem::size_of::<T>();
        let Some(bytes) = len
            .checked_mul(size)
            .and_then(|n| start.checked_add(n))
            .and_then(|end| (**shared).as_ref().get(start..end))
        else {
            return Vec::new().into();
        };
        let aligned = (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>());
        if cfg!(target_endian = "little") && aligned {
            Elems {
                repr: Repr::InPlace {
                    bytes: Arc::clone(shared),
                    start,
                    len,
                },
            }
        } else {
            Elems::decode(bytes)
        }
    }

    /// Whether these elements are viewed in place in the bytes the plan was loaded from
    /// (a mapped `model.weights` or a buffer handed over whole), rather than copied.
    pub fn is_in_place(&self) -> bool {
        matches!(self.repr, Repr::InPlace { .. })
    }
}

impl<T: Element> Deref for Elems<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &self.repr {
            Repr::Owned(v) => v,
            Repr::InPlace { bytes, start, len } => {
                let base = (**bytes).as_ref().as_ptr();
                // SAFETY: `in_place` made this only after checking that the
                // `len * size_of::<T>()` bytes at `start` lie inside `bytes` and that their
                // address is aligned for `T`, on a little-endian host, so they are `len`
                // values of `T` in memory order (`Element` is sealed to f32 and u16, for which
                // every bit pattern is a value). The bytes are kept alive by the `Arc` this
                // borrow comes from and never change: a read-only mapping, or a `Vec<u8>`
                // moved into the `Arc` (an `AsRef` view of either returns the same address
                // every time).
                unsafe { std::slice::from_raw_parts(base.add(*start).cast::<T>(), *len) }
            }
        }
    }
}

impl<T: Element> From<Vec<T>> for Elems<T> {
    fn from(v: Vec<T>) -> Elems<T> {
        Elems {
            repr: Repr::Owned(v),
        }
    }
}

impl<T: Element> Clone for Elems<T> {
    /// Owned elements are copied; elements in place share their bytes.
    fn clone(&self) -> Elems<T> {
        let repr = match &self.repr {
            Repr::Owned(v) => Repr::Owned(v.clone()),
            Repr::InPlace { bytes, start, len } => Repr::InPlace {
                bytes: Arc::clone(bytes),
                start: *start,
                len: *len,
            },
        };
        Elems { repr }
    }
}

impl<T: Element> PartialEq for Elems<T> {
    /// Bit for bit, as the weights are stored (so a NaN weight equals itself).
    fn eq(&self, other: &Elems<T>) -> bool {
        self.len() == other.len()
            && self
                .iter()
                .zip(other.iter())
                .all(|(a, b)| a.bits() == b.bits())
    }
}

impl<T: Element> fmt::Debug for Elems<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self[..], f)
    }
}

/// Maps a whole file read-only, its pages faulted in up front (`MAP_POPULATE`), so the first
/// forward does not stall on page faults across its threads.
pub(crate) fn map_file(file: &std::fs::File) -> std::io::Result<Shared> {
    // SAFETY: the mapping is read-only and its contents are only read as plain bytes or as
    // f32 / u16 values (any bit pattern). The remaining hazard of any file mapping, another
    // process changing or truncating the file meanwhile, is the condition stated in this
    // module's documentation; ngpt itself replaces files by rename, never in place.
    let map: Mmap = unsafe { memmap2::MmapOptions::new().populate().map(file)? };
    Ok(Arc::new(map))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn elements_in_place_are_the_decoded_ones_and_misaligned_ones_are_copied() {
        let mut bytes = vec![0u8; 4]; // 4 bytes of padding before the f32s
        let values = [1.5f32, -2.25, f32::MIN_POSITIVE, 3e38];
        for v in values {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&bytes).unwrap();
        let map = map_file(&file).unwrap();
        // A Vec<u8> from the allocator is at least 8-byte aligned, as a page is.
        let vec: Shared = Arc::new(bytes.clone());
        for shared in [map, vec] {
            let aligned = Elems::<f32>::in_place(&shared, 4, 4);
            assert_eq!(aligned.is_in_place(), cfg!(target_endian = "little"));
            assert_eq!(&aligned[..], &values);
            assert_eq!(aligned, Elems::<f32>::decode(&bytes[4..]));
            assert_eq!(aligned.clone().is_in_place(), aligned.is_in_place());

            // An offset of 1 is misaligned for f32 and u16: a copy, the same as decoding.
            let odd = Elems::<u16>::in_place(&shared, 1, 3);
            assert!(!odd.is_in_place());
            assert_eq!(odd, Elems::<u16>::decode(&bytes[1..7]));

            // Out of bounds: empty (validation refuses such a plan before this is reached).
            assert!(Elems::<f32>::in_place(&shared, 8, 4).is_empty());
            assert!(Elems::<f32>::in_place(&shared, usize::MAX, 2).is_empty());
        }
        // Equality is of the stored bits: a NaN equals itself, -0 is not 0.
        let nan = Elems::<f32>::from(vec![f32::NAN, 1.0]);
        assert_eq!(nan, nan.clone());
        assert_ne!(Elems::<f32>::from(vec![-0.0]), Elems::from(vec![0.0]));
        assert_ne!(Elems::<f32>::from(vec![1.0]), Elems::from(vec![1.0, 1.0]));
    }
}
