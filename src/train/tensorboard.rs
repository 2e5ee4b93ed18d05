//! TensorBoard event files (`--report_to tensorboard`), written without TensorFlow: the
//! format is small.
//!
//! An event file is a sequence of TFRecords, each
//! `len: u64 LE · masked_crc32c(len): u32 LE · data[len] · masked_crc32c(data): u32 LE`, where
//! `masked(c) = ((c >> 15) | (c << 17)) + 0xa282ead8` (mod 2³²) and CRC-32C is the Castagnoli
//! CRC (reflected polynomial 0x82F63B78). Each `data` is an `Event` protobuf
//! (tensorflow/core/util/event.proto):
//! `wall_time: double = 1`, `step: int64 = 2`, then one of `file_version: string = 3`,
//! `summary: Summary = 5`, `session_log: SessionLog = 6`; a `Summary` holds
//! `repeated Value value = 1` with `tag: string = 1` and `simple_value: float = 2`; a
//! `SessionLog` holds `status: enum = 1` (START = 1). The first event of a file carries
//! `file_version = "brain.Event:2"`. A file whose name contains `tfevents` in a folder under
//! `--logdir` is one run to TensorBoard; files in the same folder are merged into one run.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};

/// The folder under the output folder that holds the run folders of event files (HF's
/// `logging_dir` default, `<output_dir>/runs/<run>`).
pub const RUNS_DIR: &str = "runs";

/// The reflected Castagnoli polynomial.
const CASTAGNOLI: u32 = 0x82F6_3B78;

/// The 256 entries of the byte-at-a-time CRC-32C table, built at compile time.
const CRC_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ CASTAGNOLI
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// CRC-32C (Castagnoli) of `data`.
///
/// ```
/// // The check value of the CRC catalogue.
/// assert_eq!(mfac_lab::train::tensorboard::crc32c(b"123456789"), 0xE306_9283);
/// ```
pub fn crc32c(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |c, &b| {
        CRC_TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8)
    })
}

/// TFRecord's masked CRC: rotated right by 15 bits plus a constant, so that a CRC stored in
/// data that is itself CRC'd does not cancel.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord around `data`.
pub fn tf_record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// A protobuf varint.
fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field (wire type 2).
fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    varint(out, ((field as u64) << 3) | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// What an event carries after its time and step.
enum Payload<'a> {
    FileVersion,
    Scalars(&'a [(&'a str, f64)]),
    SessionStart,
}

/// An `Event` protobuf.
fn event(wall_time: f64, step: i64, payload: Payload) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.push(0x09); // field 1, 64-bit
    out.extend_from_slice(&wall_time.to_le_bytes());
    out.push(0x10); // field 2, varint
    varint(&mut out, step as u64);
    match payload {
        Payload::FileVersion => bytes_field(&mut out, 3, b"brain.Event:2"),
        Payload::Scalars(values) => {
            let mut summary = vec![];
            for (tag, v) in values {
                let mut value = vec![];
                bytes_field(&mut value, 1, tag.as_bytes());
                value.push(0x15); // field 2, 32-bit
                value.extend_from_slice(&(*v as f32).to_le_bytes());
                bytes_field(&mut summary, 1, &value);
            }
            bytes_field(&mut out, 5, &summary);
        }
        Payload::SessionStart => bytes_field(&mut out, 6, &[0x08, 0x01]), // status = START
    }
    out
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Appends events to a new file `events.out.tfevents.<time>.<host>.<pid>` in a run folder.
/// Each event is written and flushed as it comes (a killed run loses at most the event being
/// written; TensorBoard skips a truncated last record). A new writer never opens an existing
/// file: two processes, or a resumed run, each get their own.
///
/// ```
/// use mfac_lab::train::tensorboard::EventWriter;
/// let dir = tempfile::tempdir()?;
/// let mut w = EventWriter::create(dir.path(), None)?;
/// w.scalars(1, &[("train/loss", 1.09)])?;
/// assert!(w.path().file_name().unwrap().to_string_lossy().starts_with("events.out.tfevents."));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

impl EventWriter {
    /// A writer into folder `dir` (made if missing). `resumed_at`: the step a resumed run
    /// continues from; a `SessionLog START` at that step tells TensorBoard to drop what the
    /// earlier process logged after it (steps it trained again).
    pub fn create(dir: &Path, resumed_at: Option<usize>) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("creating", dir, e))?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().replace(['/', '\\'], "_"))
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        let t = now();
        let base = format!(
            "events.out.tfevents.{}.{host}.{}",
            t as u64,
            std::process::id()
        );
        // A name not taken yet (a second writer within the second, in this process).
        let (file, path) = (0..1000)
            .find_map(|i| {
                let path = dir.join(format!("{base}.{i}"));
                match File::options().write(true).create_new(true).open(&path) {
                    Ok(f) => Some(Ok((f, path))),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => None,
                    Err(e) => Some(Err(Error::io("creating", &path, e))),
                }
            })
            .unwrap_or_else(|| {
                Err(Error::InvalidArgument(format!(
                    "{}: no free event file name",
                    dir.display()
                )))
            })?;
        let mut w = EventWriter { file, path };
        w.write(&event(t, 0, Payload::FileVersion))?;
        if let Some(step) = resumed_at {
            w.write(&event(t, step as i64, Payload::SessionStart))?;
        }
        Ok(w)
    }

    /// The event file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One event at `step` holding scalar summaries `(tag, value)` (stored as f32, as
    /// TensorBoard's scalars are), stamped with the current time.
    pub fn scalars(&mut self, step: usize, values: &[(&str, f64)]) -> Result<()> {
        self.write(&event(now(), step as i64, Payload::Scalars(values)))
    }

    fn write(&mut self, data: &[u8]) -> Result<()> {
        let rec = tf_record(data);
        self.file
            .write_all(&rec)
            .and_then(|()| self.file.flush())
            .map_err(|e| Error::io("writing", &self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_published_vectors() {
        // RFC 3720 (iSCSI), B.4: 32 bytes of zeros, of 0xff, and ascending 0..31.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        let asc: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&asc), 0x46DD_794E);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn varints_and_a_scalar_event_by_hand() {
        let mut v = vec![];
        varint(&mut v, 300);
        assert_eq!(v, [0xac, 0x02]);
        // wall_time 0.0, step 1, summary { value { tag "a" simple_value 1.0 } }.
        let e = event(0.0, 1, Payload::Scalars(&[("a", 1.0)]));
        let mut want = vec![0x09, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0x01];
        want.extend_from_slice(&[0x2a, 0x0a, 0x0a, 0x08, 0x0a, 0x01, b'a', 0x15]);
        want.extend_from_slice(&1.0f32.to_le_bytes());
        assert_eq!(e, want);
    }
}
