//! Caller memory named by `(address, length)` pairs: the one place the module turns Python's
//! integers into slices, after checking them. Every view is `unsafe` to take; the callers say
//! why it is sound.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// Caller memory named by `(address, length)` pairs, checked for null, empty and overlapping
/// ranges. The caller promises the memory stays valid and untouched for the call.
pub(crate) struct Segments {
    per_key: Vec<Vec<(usize, usize)>>,
}

impl Segments {
    pub(crate) fn new(segments: Vec<Vec<(usize, usize)>>, keys: usize) -> PyResult<Self> {
        if segments.len() != keys {
            return Err(PyValueError::new_err(format!(
                "{keys} keys but {} segment lists",
                segments.len()
            )));
        }
        let mut all: Vec<(usize, usize, usize)> = Vec::new();
        for (i, segs) in segments.iter().enumerate() {
            if segs.is_empty() {
                return Err(PyValueError::new_err(format!("segments[{i}] is empty")));
            }
            for &(addr, len) in segs {
                if addr == 0 || len == 0 || addr.checked_add(len).is_none() {
                    return Err(PyValueError::new_err(format!(
                        "segments[{i}] has an invalid segment (address {addr:#x}, length {len})"
                    )));
                }
                all.push((addr, len, i));
            }
        }
        all.sort_unstable();
        for w in all.windows(2) {
            if w[0].0 + w[0].1 > w[1].0 {
                return Err(PyValueError::new_err(format!(
                    "segments of keys {} and {} overlap at {:#x}",
                    w[0].2, w[1].2, w[1].0
                )));
            }
        }
        Ok(Self { per_key: segments })
    }

    /// Total bytes of key `i`.
    pub(crate) fn len(&self, i: usize) -> usize {
        self.per_key[i].iter().map(|s| s.1).sum()
    }

    /// Read-only views.
    ///
    /// # Safety
    /// Every segment must be readable memory that outlives the returned slices.
    pub(crate) unsafe fn read(&self) -> Vec<Vec<&'static [u8]>> {
        self.per_key
            .iter()
            // SAFETY: the caller of `read` guarantees the ranges are valid for the call.
            .map(|segs| {
                segs.iter()
                    .map(|&(a, l)| unsafe { std::slice::from_raw_parts(a as *const u8, l) })
                    .collect()
            })
            .collect()
    }

    /// Writable views.
    ///
    /// # Safety
    /// Every segment must be writable memory that outlives the returned slices; `new` already
    /// checked that no two segments overlap, so the slices do not alias each other.
    pub(crate) unsafe fn write(&self) -> Vec<Vec<&'static mut [u8]>> {
        self.per_key
            .iter()
            // SAFETY: as above; disjointness was checked in `new`.
            .map(|segs| {
                segs.iter()
                    .map(|&(a, l)| unsafe { std::slice::from_raw_parts_mut(a as *mut u8, l) })
                    .collect()
            })
            .collect()
    }
}
