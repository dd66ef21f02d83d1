//! Minimal `.npy` (format 1.0) support for little-endian float32 arrays in C order.
//!
//! Enough to hand tensors to numpy-based tests and golden scripts (`np.load`) without a
//! dependency; the reader accepts what numpy's `np.save` writes for `float32` arrays.

use anyhow::{anyhow, bail, ensure, Context, Result};
use std::io::Write;
use std::path::Path;

const MAGIC: &[u8; 6] = b"\x93NUMPY";
/// numpy aligns the data start to 64 bytes (since numpy 1.14).
const ALIGN: usize = 64;

/// Writes `data` as a float32 `.npy` file with the given `shape`.
///
/// The shape must match the number of elements. The file appears whole or not at all
/// ([`crate::files::write_atomic`]); callers check the path first ([`crate::files::OutputRules`]).
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    write_with(path, shape, [data].into_iter())
}

/// [`write_f32`] of `rows` of `width` values each (`[rows, width]`), without joining them first.
pub fn write_f32_rows(path: &Path, width: usize, rows: &[Vec<f32>]) -> Result<()> {
    write_with(path, &[rows.len(), width], rows.iter().map(Vec::as_slice))
}

/// The values of `parts`, in order, as one `.npy` array of `shape`.
fn write_with<'a>(path: &Path, shape: &[usize], parts: impl Iterator<Item = &'a [f32]> + Clone) -> Result<()> {
    let given: usize = parts.clone().map(<[f32]>::len).sum();
    let expected = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| anyhow!("npy shape {shape:?} overflows"))?;
    ensure!(
        expected == given,
        "npy shape {shape:?} needs {expected} values but {given} were given (writing {})",
        path.display()
    );
    let dims = match shape {
        [] => String::new(),
        [d] => format!("{d},"),
        _ => shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({dims}), }}");
    // magic(6) + version(2) + header_len(2) + header + '\n' is padded with spaces to ALIGN.
    let unpadded = MAGIC.len() + 2 + 2 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(ALIGN) - unpadded));
    header.push('\n');
    let header_len = u16::try_from(header.len()).map_err(|_| anyhow!("npy header too long for shape {shape:?}"))?;

    crate::files::write_atomic(path, |w| {
        w.write_all(MAGIC)?;
        w.write_all(&[1, 0])?;
        w.write_all(&header_len.to_le_bytes())?;
        w.write_all(header.as_bytes())?;
        let mut buf = Vec::with_capacity(64 * 1024 * 4);
        for chunk in parts.flat_map(|p| p.chunks(64 * 1024)) {
            buf.clear();
            for v in chunk {
                buf.extend_from_slice(&v.to_le_bytes());
            }
            w.write_all(&buf)?;
        }
        Ok(())
    })
}

/// Reads a float32 `.npy` file (format 1.x, 2.x or 3.x, little-endian `<f4`, C order).
///
/// Returns the shape and the values in C order.
pub fn read_f32(path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let bytes = crate::files::read_limited(path, 16 << 30, "npy file")?;
    parse(&bytes).with_context(|| format!("invalid npy file {}", path.display()))
}

fn parse(bytes: &[u8]) -> Result<(Vec<usize>, Vec<f32>)> {
    ensure!(bytes.len() >= 10 && bytes.starts_with(MAGIC), "missing NUMPY magic");
    let (header_len, header_start) = match bytes[6] {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 => {
            ensure!(bytes.len() >= 12, "file too short");
            let len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
            (usize::try_from(len)?, 12)
        }
        v => bail!("unsupported npy version {v}"),
    };
    let data_start = header_start + header_len;
    ensure!(bytes.len() >= data_start, "header runs past the end of the file");
    let header = std::str::from_utf8(&bytes[header_start..data_start])?;

    let descr_text = dict_value(header, "descr")?;
    let descr = descr_text
        .strip_prefix(['\'', '"'])
        .and_then(|s| s.split(['\'', '"']).next())
        .ok_or_else(|| anyhow!("malformed descr {descr_text}"))?;
    ensure!(descr == "<f4", "dtype is '{descr}', expected '<f4' (little-endian float32)");
    let fortran = dict_value(header, "fortran_order")?;
    ensure!(fortran.starts_with("False"), "Fortran-ordered arrays are not supported");
    let shape_text = dict_value(header, "shape")?;
    let inner = shape_text
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| anyhow!("malformed shape {shape_text}"))?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| anyhow!("malformed shape {shape_text}")))
        .collect::<Result<Vec<_>>>()?;

    let count = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| anyhow!("shape {shape:?} overflows"))?;
    let payload = &bytes[data_start..];
    ensure!(payload.len() == count * 4, "shape {shape:?} needs {} data bytes, file has {}", count * 4, payload.len());
    let data = payload.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    Ok((shape, data))
}

/// Text right after `'key':` in a numpy header dict.
fn dict_value<'a>(header: &'a str, key: &str) -> Result<&'a str> {
    let needle = format!("'{key}':");
    let at = header.find(&needle).ok_or_else(|| anyhow!("header has no '{key}' entry"))?;
    Ok(header[at + needle.len()..].trim_start())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("internvl-npy-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    #[test]
    fn round_trip_shapes() {
        for shape in [vec![], vec![5], vec![2, 3], vec![2, 3, 4, 1], vec![0, 3]] {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|i| i as f32 * -0.5 + 0.1).collect();
            let p = tmp("rt.npy");
            write_f32(&p, &shape, &data).unwrap();
            let bytes = std::fs::read(&p).unwrap();
            let header_len = usize::from(u16::from_le_bytes([bytes[8], bytes[9]]));
            assert_eq!((10 + header_len) % ALIGN, 0);
            assert_eq!(bytes[10 + header_len - 1], b'\n');
            let (s, d) = read_f32(&p).unwrap();
            assert_eq!(s, shape);
            assert_eq!(d, data);
        }
    }

    #[test]
    fn header_text_matches_numpy() {
        let p = tmp("hdr.npy");
        write_f32(&p, &[3], &[1.0, 2.0, 3.0]).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let header_len = usize::from(u16::from_le_bytes([bytes[8], bytes[9]]));
        let text = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
        assert!(text.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }"));
    }

    #[test]
    fn errors() {
        let p = tmp("bad.npy");
        assert!(write_f32(&p, &[2, 2], &[1.0]).is_err());
        std::fs::write(&p, b"not numpy").unwrap();
        let e = read_f32(&p).unwrap_err();
        assert!(format!("{e:#}").contains("bad.npy"));
        assert!(read_f32(&tmp("missing.npy")).is_err());
    }
}
