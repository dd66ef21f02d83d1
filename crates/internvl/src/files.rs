//! Every file the runtime reads from a user or writes for one goes through here, so that the promises
//! hold in one place: inputs are regular files opened without blocking, their size is checked against a
//! bound before a byte is read, and outputs never replace an input or a model file, never overwrite
//! without being asked, and appear whole or not at all (a temporary file beside them, then a rename).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::error::{ErrorKind, WithKind};

const MIB: u64 = 1 << 20;

/// Largest image file read: the largest image Pillow accepts (179 M pixels) stored uncompressed as 32-bit
/// BMP or TIFF is 716 MB; anything larger cannot be an image the reference would open.
pub const MAX_IMAGE_FILE: u64 = 768 * MIB;
/// A history or forced-token file: far more text than any model's context holds.
pub const MAX_TEXT_FILE: u64 = 64 * MIB;
/// `manifest.json` is a few KiB.
pub const MAX_MANIFEST_FILE: u64 = MIB;
/// `tokenizer.json` (Qwen2's is 7 MB, the largest shipped with InternVL about 17 MB).
pub const MAX_TOKENIZER_FILE: u64 = 256 * MIB;

/// Opens `path` for reading without blocking on it (a FIFO opens at once instead of waiting for a
/// writer) and accepts only a regular file of at most `limit` bytes; `what` names it in errors ("image
/// file", "history file").
pub fn open_regular(path: &Path, limit: u64, what: &str) -> Result<(File, u64)> {
    let shown = path.display();
    let file = match OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!("{what} not found: {shown}"),
        Err(e) => bail!("cannot open {what} {shown}: {e}"),
    };
    let meta = file.metadata().with_context(|| format!("cannot read {what} {shown}"))?;
    let ft = meta.file_type();
    if !ft.is_file() {
        let kind = if ft.is_dir() {
            "a directory"
        } else if ft.is_fifo() {
            "a FIFO (named pipe)"
        } else if ft.is_char_device() || ft.is_block_device() {
            "a device"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        bail!("{what} {shown} is {kind}; give a regular file");
    }
    let size = meta.len();
    if size > limit {
        bail!("{what} {shown} is {size} bytes, more than the limit of {limit} bytes");
    }
    Ok((file, size))
}

/// The whole of `path` (see [`open_regular`]); a file that grows past `limit` while being read is refused too.
pub fn read_limited(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>> {
    let (file, size) = open_regular(path, limit, what)?;
    let mut data = Vec::with_capacity(size as usize);
    file.take(limit + 1).read_to_end(&mut data).with_context(|| format!("cannot read {what} {}", path.display()))?;
    if data.len() as u64 > limit {
        bail!("{what} {} grew past the limit of {limit} bytes while being read", path.display());
    }
    Ok(data)
}

/// [`read_limited`] as UTF-8 text.
pub fn read_text(path: &Path, limit: u64, what: &str) -> Result<String> {
    let data = read_limited(path, limit, what)?;
    String::from_utf8(data).map_err(|e| {
        anyhow::anyhow!(
            "{what} {} is not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

/// Where a command may write: checked before any work, so a refused path costs nothing and destroys nothing.
#[derive(Debug, Default)]
pub struct OutputRules<'a> {
    /// Files the command reads: an output must not be one of them.
    pub inputs: Vec<&'a Path>,
    /// The model folder: nothing is written inside it.
    pub model_dir: Option<&'a Path>,
    /// Replace an existing file (never an input).
    pub force: bool,
}

impl OutputRules<'_> {
    /// Refuses `path` (named in errors as `flag`) when it is an input, lies inside the model folder, is
    /// not a regular file, or exists and `force` is off; its folder must exist.
    pub fn check(&self, path: &Path, flag: &str) -> Result<()> {
        let shown = path.display();
        if path.as_os_str().as_encoded_bytes().ends_with(b"/") {
            bail_usage(format!("{flag} {shown} ends with '/': give a file name"))?;
        }
        let name =
            path.file_name().with_context(|| format!("{flag} {shown}: not a file name")).kind(ErrorKind::Usage)?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let dir = parent
            .canonicalize()
            .with_context(|| format!("{flag} {shown}: folder {} does not exist", parent.display()))
            .kind(ErrorKind::Usage)?;
        let target = dir.join(name);
        if let Some(model) = self.model_dir.and_then(|m| m.canonicalize().ok()) {
            if target.starts_with(&model) {
                bail_usage(format!(
                    "{flag} {shown} is inside the model folder {}; write outputs elsewhere",
                    model.display()
                ))?;
            }
        }
        for input in &self.inputs {
            if resolved(input).is_some_and(|p| p == target) {
                bail_usage(format!(
                    "{flag} {shown} is also an input ({}); choose another output path",
                    input.display()
                ))?;
            }
        }
        if std::fs::symlink_metadata(&target).is_ok_and(|m| m.file_type().is_symlink()) {
            // Replacing the link would surprise, following it could reach anything: name the file itself.
            bail_usage(format!("{flag} {shown} is a symbolic link; give the path of a file instead"))?;
        }
        match std::fs::metadata(&target) {
            Ok(meta) => {
                for input in &self.inputs {
                    if same_file(&meta, input) {
                        bail_usage(format!(
                            "{flag} {shown} is also an input ({}); choose another output path",
                            input.display()
                        ))?;
                    }
                }
                if !meta.is_file() {
                    bail_usage(format!("{flag} {shown} exists and is not a regular file"))?;
                }
                if !self.force {
                    bail_usage(format!("{flag} {shown} already exists; pass --force to replace it"))?;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => bail_usage(format!("{flag} {shown}: {e}"))?,
        }
        Ok(())
    }
}

/// `path` with its folder resolved (the file itself need not exist): how two spellings of one path that
/// is not written yet compare equal.
fn resolved(path: &Path) -> Option<PathBuf> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Some(parent.canonicalize().ok()?.join(path.file_name()?))
}

fn bail_usage(msg: String) -> Result<()> {
    Err(anyhow::anyhow!(msg)).kind(ErrorKind::Usage)
}

fn same_file(meta: &std::fs::Metadata, other: &Path) -> bool {
    std::fs::metadata(other).is_ok_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino())
}

/// Writes `path` whole or not at all: `write` fills a temporary file beside it, which is synced and renamed
/// over `path` only when everything succeeded; on any error the temporary file is removed and `path` is
/// as it was.
pub fn write_atomic(path: &Path, write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>) -> Result<()> {
    let tmp = temp_beside(path);
    let result = (|| -> std::io::Result<()> {
        let file = OpenOptions::new().write(true).create_new(true).mode(0o644).open(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        write(&mut w)?;
        w.flush()?;
        w.get_ref().sync_all()?;
        drop(w);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        bail!("cannot write {}: {e}", path.display());
    }
    Ok(())
}

/// `dir/.name.tmp-PID`: same folder (so the rename is atomic), hidden, unique per process.
fn temp_beside(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("internvl-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn refuses_fifo_device_directory_and_large_files() {
        let d = dir("read");
        let fifo = d.join("pipe");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_limited(&fifo, 10, "image file").unwrap_err().to_string();
        assert!(e.contains("FIFO") && e.contains("pipe"), "{e}");
        let e = read_limited(Path::new("/dev/zero"), 10, "history file").unwrap_err().to_string();
        assert!(e.contains("a device"), "{e}");
        assert!(read_limited(&d, 10, "x").unwrap_err().to_string().contains("directory"));
        let big = d.join("big");
        std::fs::write(&big, [0u8; 11]).unwrap();
        let e = read_limited(&big, 10, "history file").unwrap_err().to_string();
        assert!(e.contains("11 bytes") && e.contains("limit of 10"), "{e}");
        assert_eq!(read_limited(&big, 11, "x").unwrap().len(), 11);
        std::fs::write(&big, [0xFFu8, 0xFE]).unwrap();
        assert!(read_text(&big, 10, "history file").unwrap_err().to_string().contains("not UTF-8"));
    }

    #[test]
    fn outputs_never_replace_inputs_or_existing_files() {
        let d = dir("write");
        let input = d.join("photo.png");
        std::fs::write(&input, b"photo").unwrap();
        let rules = OutputRules { inputs: vec![&input], model_dir: None, force: true };
        let e = rules.check(&d.join("./photo.png"), "--out").unwrap_err().to_string();
        assert!(e.contains("also an input"), "{e}");
        let rules = OutputRules { inputs: vec![], model_dir: Some(&d), force: true };
        assert!(rules.check(&d.join("x.npy"), "--out").unwrap_err().to_string().contains("model folder"));
        let rules = OutputRules::default();
        assert!(rules.check(&input, "--out").unwrap_err().to_string().contains("--force"));
        assert!(rules.check(&d.join("nope/x.npy"), "--out").unwrap_err().to_string().contains("does not exist"));
        rules.check(&d.join("new.npy"), "--out").unwrap();
        std::os::unix::fs::symlink(d.join("elsewhere"), d.join("link.npy")).unwrap();
        assert!(rules.check(&d.join("link.npy"), "--out").unwrap_err().to_string().contains("symbolic link"));
        std::fs::remove_file(d.join("link.npy")).unwrap();
        let not_yet = d.join("sub-out.npy");
        let rules = OutputRules { inputs: vec![&not_yet], model_dir: None, force: false };
        assert!(rules
            .check(&d.join(".").join("sub-out.npy"), "--png")
            .unwrap_err()
            .to_string()
            .contains("also an input"));

        // A failed write leaves the old file and no temporary file.
        let e = write_atomic(&input, |w| {
            w.write_all(b"half")?;
            Err(std::io::Error::other("disk full"))
        });
        assert!(e.unwrap_err().to_string().contains("disk full"));
        assert_eq!(std::fs::read(&input).unwrap(), b"photo");
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
        write_atomic(&input, |w| w.write_all(b"new")).unwrap();
        assert_eq!(std::fs::read(&input).unwrap(), b"new");
    }
}
