//! Optimizer state on disk, for checkpoints: a safetensors file (readable from Python with
//! `safetensors.torch.load_file`) holding the state's arrays, with its scalars as JSON in the
//! header's metadata under `"state"`.
//!
//! Arrays are written straight from the optimizer's buffers and read straight back into them,
//! tensor by tensor, so an M-FAC window of many gigabytes is never copied in memory. Values are
//! stored bit for bit, so a resumed run continues exactly where the saved one stopped.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use safetensors::tensor::{Dtype, Metadata, View};

use crate::error::{Error, Result};
use crate::optim::util::Elem;

/// A plain value an optimizer state holds: the floats ([`Elem`]) and the unsigned integers of
/// index arrays (the sparse M-FAC window's columns and segment tables).
pub(crate) trait Stored: Copy + 'static {
    /// Its safetensors dtype (little-endian bytes).
    const DTYPE: Dtype;
}
impl<T: Elem> Stored for T {
    const DTYPE: Dtype = <T as Elem>::DTYPE;
}
impl Stored for u16 {
    const DTYPE: Dtype = Dtype::U16;
}
impl Stored for u32 {
    const DTYPE: Dtype = Dtype::U32;
}

fn bytes_of<T: Stored>(v: &[T]) -> &[u8] {
    // SAFETY: T is f32, f64, bf16, f16, u16 or u32: no padding, every bit pattern valid; the
    // byte view covers exactly the slice's memory and borrows it.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

fn bytes_of_mut<T: Stored>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: as in `bytes_of`; any bytes written are a valid T.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, std::mem::size_of_val(v)) }
}

// Safetensors is little-endian; so is every platform candle supports.
#[cfg(target_endian = "big")]
compile_error!("optimizer checkpoints assume a little-endian machine");

struct Array<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: &'a [u8],
}

impl View for &Array<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Collects borrowed arrays and scalars, then writes them as one safetensors file.
#[derive(Default)]
pub(crate) struct StateWriter<'a> {
    arrays: Vec<(String, Array<'a>)>,
}

impl<'a> StateWriter<'a> {
    /// Adds `values` under `name`, as a 1-D array or with `shape`.
    pub fn add<T: Stored>(&mut self, name: impl Into<String>, values: &'a [T], shape: &[usize]) {
        let shape = if shape.is_empty() {
            vec![values.len()]
        } else {
            shape.to_vec()
        };
        debug_assert_eq!(shape.iter().product::<usize>(), values.len());
        self.arrays.push((
            name.into(),
            Array {
                dtype: T::DTYPE,
                shape,
                bytes: bytes_of(values),
            },
        ));
    }

    /// Writes the file at `path` (atomically), with `scalars` as the `state` metadata.
    pub fn write(self, path: &Path, scalars: &serde_json::Value) -> Result<()> {
        let meta: HashMap<String, String> =
            [("state".to_string(), serde_json::to_string(scalars)?)].into();
        crate::io::write_atomic_with(path, |tmp| {
            safetensors::serialize_to_file(
                self.arrays.iter().map(|(n, a)| (n.as_str(), a)),
                Some(meta),
                tmp,
            )
            .map_err(|e| Error::cannot_write(path, format!("writing the optimizer state: {e}")))
        })
    }
}

/// Reads a file written by [`StateWriter`]: the scalars at once, each array on request straight
/// into the caller's buffer (checked for dtype and length).
pub(crate) struct StateReader {
    path: std::path::PathBuf,
    file: std::fs::File,
    data_start: u64,
    meta: Metadata,
    /// The `state` metadata.
    pub scalars: serde_json::Value,
}

impl StateReader {
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |message: String| Error::Weights {
            path: path.to_path_buf(),
            message,
        };
        let mut file = std::fs::File::open(path).map_err(|e| Error::io("reading", path, e))?;
        let mut n = [0u8; 8];
        file.read_exact(&mut n)
            .map_err(|e| Error::io("reading", path, e))?;
        let n = u64::from_le_bytes(n);
        if n > 100 << 20 {
            return Err(bad(format!(
                "header of {n} bytes: not an optimizer state file"
            )));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header)
            .map_err(|e| Error::io("reading", path, e))?;
        let meta: Metadata = serde_json::from_slice(&header)
            .map_err(|e| bad(format!("not an optimizer state file: {e}")))?;
        let text = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("state"))
            .ok_or_else(|| bad("no `state` metadata: not an optimizer state file".into()))?;
        let scalars = serde_json::from_str(text)?;
        Ok(StateReader {
            path: path.to_path_buf(),
            file,
            data_start: 8 + n,
            meta,
            scalars,
        })
    }

    /// Whether the file holds an array `name`.
    pub fn has(&self, name: &str) -> bool {
        self.meta.info(name).is_some()
    }

    /// Reads array `name` into `out`, which must have its dtype and length.
    pub fn read_into<T: Stored>(&mut self, name: &str, out: &mut [T]) -> Result<()> {
        let info = self.meta.info(name).ok_or_else(|| Error::Weights {
            path: self.path.clone(),
            message: format!("the optimizer state has no array {name:?}"),
        })?;
        let (a, b) = info.data_offsets;
        if info.dtype != T::DTYPE || b - a != std::mem::size_of_val(out) {
            return Err(Error::Weights {
                path: self.path.clone(),
                message: format!(
                    "array {name:?} is {:?} × {:?} but the optimizer holds {:?} × {}: the checkpoint was written by a different optimizer or model",
                    info.dtype,
                    info.shape,
                    T::DTYPE,
                    out.len()
                ),
            });
        }
        self.file
            .seek(SeekFrom::Start(self.data_start + a as u64))
            .and_then(|_| self.file.read_exact(bytes_of_mut(out)))
            .map_err(|e| Error::io("reading", &self.path, e))
    }

    /// A scalar of the `state` metadata.
    pub fn scalar<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<T> {
        let v = self
            .scalars
            .get(key)
            .cloned()
            .ok_or_else(|| Error::Weights {
                path: self.path.clone(),
                message: format!("the optimizer state has no {key:?}"),
            })?;
        serde_json::from_value(v).map_err(|e| Error::Weights {
            path: self.path.clone(),
            message: format!("{key:?}: {e}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_and_scalars_round_trip_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.safetensors");
        let a: Vec<f64> = vec![1.0 / 3.0, -0.0, f64::MIN_POSITIVE, 1e300];
        let b: Vec<half::bf16> = [0.1f32, -2.5]
            .iter()
            .map(|&x| half::bf16::from_f32(x))
            .collect();
        let mut w = StateWriter::default();
        w.add("a", &a, &[2, 2]);
        w.add("b", &b, &[]);
        w.write(&p, &serde_json::json!({"step": 7, "x": 0.1}))
            .unwrap();
        let mut r = StateReader::open(&p).unwrap();
        assert_eq!(r.scalar::<u64>("step").unwrap(), 7);
        let mut got = vec![0.0f64; 4];
        r.read_into("a", &mut got).unwrap();
        assert_eq!(
            got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            a.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        let mut gb = vec![half::bf16::ZERO; 2];
        r.read_into("b", &mut gb).unwrap();
        assert_eq!(gb, b);
        // A wrong length or dtype is an error naming the array.
        let mut short = vec![0.0f64; 3];
        assert!(r
            .read_into("a", &mut short)
            .unwrap_err()
            .to_string()
            .contains("\"a\""));
        let mut f = vec![0.0f32; 4];
        assert!(r.read_into("a", &mut f).is_err());
    }
}
