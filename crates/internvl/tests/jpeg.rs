//! JPEG kinds Pillow cannot write (its encoder has no arithmetic coding, restart intervals, 4:1:1 /
//! 4:4:0 / 4:4:1 sampling, Adobe RGB, YCCK or lossless mode): written here by libjpeg-turbo's own
//! encoder, then decoded by Pillow (the reference, `Image.open(f).convert('RGB')`, run in this test)
//! and by `internvl::media::image::load_image`; the pixels must be equal byte for byte.
//! The kinds Pillow writes are tested against the reference tiles in tests/python/test_preprocess.py.

use std::path::{Path, PathBuf};
use std::process::Command;

use turbojpeg_sys as tj;

/// One file to write: sampling, colour space, parameters.
struct Kind {
    name: &'static str,
    subsamp: tj::TJSAMP,
    /// Colour space of the JPEG; the source is RGB, or CMYK for CMYK / YCCK.
    colorspace: tj::TJCS,
    params: &'static [(tj::TJPARAM, i32)],
}

const KINDS: &[Kind] = &[
    Kind { name: "s411", subsamp: tj::TJSAMP_TJSAMP_411, colorspace: tj::TJCS_TJCS_YCbCr, params: &[] },
    Kind { name: "s440", subsamp: tj::TJSAMP_TJSAMP_440, colorspace: tj::TJCS_TJCS_YCbCr, params: &[] },
    Kind { name: "s441", subsamp: tj::TJSAMP_TJSAMP_441, colorspace: tj::TJCS_TJCS_YCbCr, params: &[] },
    Kind {
        name: "arithmetic-420",
        subsamp: tj::TJSAMP_TJSAMP_420,
        colorspace: tj::TJCS_TJCS_YCbCr,
        params: &[(tj::TJPARAM_TJPARAM_ARITHMETIC, 1)],
    },
    Kind {
        name: "arithmetic-progressive-422",
        subsamp: tj::TJSAMP_TJSAMP_422,
        colorspace: tj::TJCS_TJCS_YCbCr,
        params: &[(tj::TJPARAM_TJPARAM_ARITHMETIC, 1), (tj::TJPARAM_TJPARAM_PROGRESSIVE, 1)],
    },
    Kind {
        name: "restart-every-block",
        subsamp: tj::TJSAMP_TJSAMP_420,
        colorspace: tj::TJCS_TJCS_YCbCr,
        params: &[(tj::TJPARAM_TJPARAM_RESTARTBLOCKS, 1)],
    },
    Kind {
        name: "restart-rows-progressive",
        subsamp: tj::TJSAMP_TJSAMP_444,
        colorspace: tj::TJCS_TJCS_YCbCr,
        params: &[(tj::TJPARAM_TJPARAM_RESTARTROWS, 2), (tj::TJPARAM_TJPARAM_PROGRESSIVE, 1)],
    },
    Kind { name: "adobe-rgb", subsamp: tj::TJSAMP_TJSAMP_444, colorspace: tj::TJCS_TJCS_RGB, params: &[] },
    Kind { name: "gray", subsamp: tj::TJSAMP_TJSAMP_GRAY, colorspace: tj::TJCS_TJCS_GRAY, params: &[] },
    Kind { name: "cmyk", subsamp: tj::TJSAMP_TJSAMP_444, colorspace: tj::TJCS_TJCS_CMYK, params: &[] },
    Kind { name: "ycck-420", subsamp: tj::TJSAMP_TJSAMP_420, colorspace: tj::TJCS_TJCS_YCCK, params: &[] },
    Kind {
        name: "ycck-progressive",
        subsamp: tj::TJSAMP_TJSAMP_422,
        colorspace: tj::TJCS_TJCS_YCCK,
        params: &[(tj::TJPARAM_TJPARAM_PROGRESSIVE, 1)],
    },
    Kind {
        name: "lossless",
        subsamp: tj::TJSAMP_TJSAMP_444,
        colorspace: tj::TJCS_TJCS_YCbCr,
        params: &[(tj::TJPARAM_TJPARAM_LOSSLESS, 1), (tj::TJPARAM_TJPARAM_LOSSLESSPSV, 7)],
    },
];

/// The workspace's root (this crate is `crates/internvl`).
fn root() -> PathBuf {
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    here.ancestors().nth(2).unwrap_or(here).to_path_buf()
}

/// Photo-like test content: smooth fields, noise and hard edges, as `channels`-sample pixels.
fn content(w: usize, h: usize, channels: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut rnd = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) as u32
    };
    let mut out = vec![0u8; w * h * channels];
    for y in 0..h {
        for x in 0..w {
            for c in 0..channels {
                let wave = 127.0 + 100.0 * ((x as f64 * (c + 1) as f64 / 23.0) + (y as f64 / 17.0)).sin();
                let edge = if (x / 37 + y / 29 + c) % 5 == 0 { 60.0 } else { 0.0 };
                let v = wave + edge + f64::from(rnd() % 31) - 15.0;
                out[(y * w + x) * channels + c] = v.clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

/// Encodes with libjpeg-turbo (quality 90).
fn encode(kind: &Kind, w: usize, h: usize) -> Vec<u8> {
    let cmyk = matches!(kind.colorspace, tj::TJCS_TJCS_CMYK | tj::TJCS_TJCS_YCCK);
    let (format, channels) = if cmyk { (tj::TJPF_TJPF_CMYK, 4) } else { (tj::TJPF_TJPF_RGB, 3) };
    let src = content(w, h, channels, (w * 31 + h) as u64);
    unsafe {
        let handle = tj::tj3Init(tj::TJINIT_TJINIT_COMPRESS as i32);
        assert!(!handle.is_null());
        let lossless = kind.params.iter().any(|&(p, _)| p == tj::TJPARAM_TJPARAM_LOSSLESS);
        let mut params =
            vec![(tj::TJPARAM_TJPARAM_SUBSAMP, kind.subsamp), (tj::TJPARAM_TJPARAM_COLORSPACE, kind.colorspace as i32)];
        if !lossless {
            params.push((tj::TJPARAM_TJPARAM_QUALITY, 90));
        }
        params.extend(kind.params.iter().copied());
        for (p, v) in params {
            assert_eq!(tj::tj3Set(handle, p as i32, v), 0, "{}: tj3Set({p}, {v})", kind.name);
        }
        let mut buf: *mut u8 = std::ptr::null_mut();
        let mut size: tj::size_t = 0;
        let rc = tj::tj3Compress8(
            handle,
            src.as_ptr(),
            w as i32,
            (w * channels) as i32,
            h as i32,
            format,
            &mut buf,
            &mut size,
        );
        let msg = std::ffi::CStr::from_ptr(tj::tj3GetErrorStr(handle)).to_string_lossy().into_owned();
        assert_eq!(rc, 0, "{}: {msg}", kind.name);
        let jpeg = std::slice::from_raw_parts(buf, size as usize).to_vec();
        tj::tj3Free(buf.cast());
        tj::tj3Destroy(handle);
        jpeg
    }
}

/// Pillow's `Image.open(f).convert('RGB')` of each file, as raw bytes written beside it (`.rgb`).
/// Pillow feeds libjpeg through a suspending source in 64 KiB blocks, and libjpeg's arithmetic decoder
/// cannot suspend: with the default block size Pillow refuses arithmetic-coded files above 64 KiB
/// ("broken data stream"). The oracle gives it the whole file in one block, so those decode too.
fn pillow_decode(files: &[PathBuf]) {
    let script = "import sys\nfrom PIL import Image, ImageFile\nImageFile.MAXBLOCK = 1 << 30\n\
                  for f in sys.argv[1:]:\n    \
                  open(f + '.rgb', 'wb').write(Image.open(f).convert('RGB').tobytes())\n";
    let python = std::env::var_os("INTERNVL_PYTHON").map(PathBuf::from).unwrap_or(root().join(".venv/bin/python"));
    let status = Command::new(&python)
        .arg("-c")
        .arg(script)
        .args(files)
        .status()
        .unwrap_or_else(|e| panic!("running {}: {e} (scripts/setup.sh creates it)", python.display()));
    assert!(status.success(), "Pillow failed to decode the test JPEGs");
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("internvl-jpeg-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn check_all(dir: &Path, sizes: &[(usize, usize)]) {
    let mut files = Vec::new();
    for kind in KINDS {
        for &(w, h) in sizes {
            let path = dir.join(format!("{}-{w}x{h}.jpg", kind.name));
            std::fs::write(&path, encode(kind, w, h)).unwrap();
            files.push(path);
        }
    }
    pillow_decode(&files);
    let mut failures = Vec::new();
    for path in &files {
        let want = std::fs::read(format!("{}.rgb", path.display())).unwrap();
        let got = internvl::media::image::load_image(path, false).unwrap_or_else(|e| panic!("{e:#}"));
        if got.as_raw() != &want {
            let diff = got.as_raw().iter().zip(&want).filter(|(a, b)| a != b).count();
            failures.push(format!("{} ({diff} of {} bytes differ)", path.display(), want.len()));
        }
    }
    assert!(failures.is_empty(), "not byte-identical to Pillow: {failures:#?}");
}

#[test]
fn jpeg_kinds_pillow_cannot_write_decode_as_pillow_does() {
    // Odd sizes exercise partial MCUs and the edge rows of fancy upsampling.
    check_all(&temp_dir("kinds"), &[(1, 1), (17, 9), (333, 211), (640, 480)]);
}

#[test]
fn corrupt_entropy_data_still_decodes() {
    // Bytes flipped inside the scan (markers kept): libjpeg warns and goes on, and Pillow ignores the
    // warning, so the file must decode here too. The pixels after the damage follow libjpeg's error
    // recovery, which is not always Pillow's (measured: equal for some files, not for others).
    let dir = temp_dir("corrupt");
    let mut jpeg = encode(&KINDS[0], 200, 120);
    let sos = jpeg.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
    for i in (sos + 40..jpeg.len() - 4).step_by(97) {
        if jpeg[i] != 0xFF && jpeg[i - 1] != 0xFF {
            jpeg[i] ^= 0x24;
            if jpeg[i] == 0xFF {
                jpeg[i] = 0x7F;
            }
        }
    }
    let path = dir.join("corrupt.jpg");
    std::fs::write(&path, &jpeg).unwrap();
    pillow_decode(std::slice::from_ref(&path));
    let want = std::fs::read(format!("{}.rgb", path.display())).unwrap();
    let got = internvl::media::image::load_image(&path, false).unwrap();
    assert_eq!((got.width(), got.height(), got.as_raw().len()), (200, 120, want.len()));
}
