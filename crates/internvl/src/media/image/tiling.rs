//! Tile-grid selection and tiling, as in the reference `dynamic_preprocess`.
//!
//! The reference builds its candidate grids with
//! `sorted(set((i, j) for n in ... for i ... for j ...), key=lambda x: x[0] * x[1])`.
//! `sorted` is stable, so grids with the same tile count keep the iteration order of the
//! Python `set`, and `find_closest_aspect_ratio` resolves exact ties by list order. With
//! `min_num = 1` the `(1, 1)` grid always beats such ties, but with other ranges the set order
//! decides, e.g. `min_num = max_num = 2` turns a 5:4 landscape image into a 1x2 *portrait* grid.
//! To pick the same grid in every case, [`target_ratios`] replays CPython's set insertion
//! (64-bit tuple hash + open addressing) instead of guessing an order.

use super::{resize_bicubic, ImageConfig};
use ::image::{imageops, RgbImage};
use anyhow::{bail, ensure, Result};

/// Largest accepted `max_tiles`. Candidate generation is cubic in it, and every tile is
/// 2.4 MB of float32 at 448 px, so larger values are almost certainly a mistake.
pub const MAX_TILES_LIMIT: u32 = 256;
/// Largest accepted tile edge (keeps every size computation far from `u32` overflow).
const MAX_IMAGE_SIZE: u32 = 8192;

/// CPython 64-bit `tuplehash` (the xxHash-based one of 3.8+) of a tuple of two small non-negative ints
/// (for which `hash(i) == i`).
fn py_tuple_hash(items: [u64; 2]) -> u64 {
    const P1: u64 = 11_400_714_785_074_694_791;
    const P2: u64 = 14_029_467_366_897_019_727;
    const P5: u64 = 2_870_177_450_012_600_261;
    let mut acc = P5;
    for lane in items {
        acc = acc.wrapping_add(lane.wrapping_mul(P2));
        acc = acc.rotate_left(31);
        acc = acc.wrapping_mul(P1);
    }
    acc = acc.wrapping_add(2 ^ (P5 ^ 3_527_539));
    if acc == u64::MAX {
        return 1_546_275_796;
    }
    acc
}

/// Minimal model of CPython's `setobject.c` table, enough to reproduce iteration order of a
/// set built by adding keys one at a time (no deletions, so no dummy entries).
struct PySet {
    table: Vec<Option<(u64, (u32, u32))>>,
    fill: usize,
}

impl PySet {
    /// `LINEAR_PROBES` in setobject.c.
    const LINEAR_PROBES: usize = 9;
    /// `PERTURB_SHIFT` in setobject.c.
    const PERTURB_SHIFT: u32 = 5;

    fn new() -> Self {
        Self {
            table: vec![None; 8], // PySet_MINSIZE
            fill: 0,
        }
    }

    /// `set_add_entry`: returns without change if the key is present.
    fn add(&mut self, key: (u32, u32)) {
        let hash = py_tuple_hash([u64::from(key.0), u64::from(key.1)]);
        let mask = self.table.len() - 1;
        let mut i = (hash as usize) & mask;
        let mut perturb = hash;
        let slot = 'probe: loop {
            let probes = if i + Self::LINEAR_PROBES <= mask { Self::LINEAR_PROBES } else { 0 };
            for j in i..=i + probes {
                match self.table[j] {
                    None => break 'probe j,
                    Some((h, k)) if h == hash && k == key => return,
                    Some(_) => {}
                }
            }
            perturb >>= Self::PERTURB_SHIFT;
            i = (i.wrapping_mul(5).wrapping_add(1).wrapping_add(perturb as usize)) & mask;
        };
        self.table[slot] = Some((hash, key));
        self.fill += 1;
        if self.fill * 5 >= mask * 3 {
            self.resize(self.fill * 4);
        }
    }

    /// `set_table_resize` followed by `set_insert_clean` of the old entries in table order.
    fn resize(&mut self, minused: usize) {
        let mut newsize = 8;
        while newsize <= minused {
            newsize <<= 1;
        }
        let old = std::mem::replace(&mut self.table, vec![None; newsize]);
        let mask = newsize - 1;
        for (hash, key) in old.into_iter().flatten() {
            let mut i = (hash as usize) & mask;
            let mut perturb = hash;
            let slot = 'probe: loop {
                if self.table[i].is_none() {
                    break i;
                }
                if i + Self::LINEAR_PROBES <= mask {
                    for j in i + 1..=i + Self::LINEAR_PROBES {
                        if self.table[j].is_none() {
                            break 'probe j;
                        }
                    }
                }
                perturb >>= Self::PERTURB_SHIFT;
                i = (i.wrapping_mul(5).wrapping_add(1).wrapping_add(perturb as usize)) & mask;
            };
            self.table[slot] = Some((hash, key));
        }
    }

    fn into_order(self) -> Vec<(u32, u32)> {
        self.table.into_iter().flatten().map(|(_, k)| k).collect()
    }
}

/// Candidate grids `(cols, rows)` in exactly the order of the reference's
/// `sorted(set(...), key=lambda x: x[0] * x[1])` (64-bit CPython; checked against 3.11).
pub fn target_ratios(min_num: u32, max_num: u32) -> Vec<(u32, u32)> {
    let mut set = PySet::new();
    for n in min_num..=max_num {
        for i in 1..=n {
            for j in 1..=n {
                let area = u64::from(i) * u64::from(j);
                if area <= u64::from(max_num) && area >= u64::from(min_num) {
                    set.add((i, j));
                }
            }
        }
    }
    let mut ratios = set.into_order();
    ratios.sort_by_key(|&(i, j)| u64::from(i) * u64::from(j)); // stable, like `sorted`
    ratios
}

/// The reference `find_closest_aspect_ratio`, with the same `f64` arithmetic and tie-break.
pub fn find_closest_aspect_ratio(
    aspect_ratio: f64,
    target_ratios: &[(u32, u32)],
    width: u32,
    height: u32,
    image_size: u32,
) -> (u32, u32) {
    let mut best_ratio_diff = f64::INFINITY;
    let mut best_ratio = (1, 1);
    // Python compares the int `width * height` with a float exactly; both sides are exact
    // integers (or halves) far below 2^53 here, so comparing as f64 is exact too.
    let area = (u64::from(width) * u64::from(height)) as f64;
    let size = f64::from(image_size);
    for &(i, j) in target_ratios {
        let target_aspect_ratio = f64::from(i) / f64::from(j);
        let ratio_diff = (aspect_ratio - target_aspect_ratio).abs();
        if ratio_diff < best_ratio_diff {
            best_ratio_diff = ratio_diff;
            best_ratio = (i, j);
        } else if ratio_diff == best_ratio_diff && area > 0.5 * size * size * f64::from(i) * f64::from(j) {
            best_ratio = (i, j);
        }
    }
    best_ratio
}

/// Grid `(cols, rows)` that `dynamic_preprocess` picks for a `width` x `height` image.
pub fn closest_grid(width: u32, height: u32, cfg: &ImageConfig) -> (u32, u32) {
    let ratios = target_ratios(cfg.min_tiles, cfg.max_tiles.min(MAX_TILES_LIMIT));
    let aspect_ratio = f64::from(width) / f64::from(height);
    find_closest_aspect_ratio(aspect_ratio, &ratios, width, height, cfg.image_size)
}

/// Tiles `dynamic_preprocess` makes of a `width` x `height` image (thumbnail included): known from the
/// header alone, so a request's length is checked before any pixel is decoded.
pub fn tile_count(width: u32, height: u32, cfg: &ImageConfig) -> usize {
    let (cols, rows) = closest_grid(width.max(1), height.max(1), cfg);
    let grid = (cols * rows) as usize;
    grid + usize::from(cfg.use_thumbnail && grid != 1)
}

fn validate(cfg: &ImageConfig) -> Result<()> {
    ensure!(
        cfg.image_size >= 1 && cfg.image_size <= MAX_IMAGE_SIZE,
        "invalid tile size {} (expected 1..={MAX_IMAGE_SIZE})",
        cfg.image_size
    );
    if cfg.min_tiles < 1 || cfg.min_tiles > cfg.max_tiles || cfg.max_tiles > MAX_TILES_LIMIT {
        bail!(
            "invalid tile range: min_tiles {} / max_tiles {} (need 1 <= min_tiles <= max_tiles <= {MAX_TILES_LIMIT})",
            cfg.min_tiles,
            cfg.max_tiles
        );
    }
    Ok(())
}

/// `dynamic_preprocess(image, min_num, max_num, image_size, use_thumbnail)`: the uint8 tiles
/// in reference order (row-major over the grid, thumbnail last) and the grid `(cols, rows)`.
///
/// The whole image is resized once to `(cols * size, rows * size)` and cut into tiles; the
/// thumbnail (only when there is more than one tile) is a separate resize of the original.
pub fn tile_images(img: &RgbImage, cfg: &ImageConfig) -> Result<(Vec<RgbImage>, (u32, u32))> {
    validate(cfg)?;
    let (width, height) = img.dimensions();
    ensure!(width > 0 && height > 0, "cannot tile an empty {width}x{height} image");
    let (cols, rows) = closest_grid(width, height, cfg);
    let size = cfg.image_size;
    // cols, rows <= MAX_TILES_LIMIT and size <= MAX_IMAGE_SIZE, so these cannot overflow.
    let resized = resize_bicubic(img, cols * size, rows * size);
    let blocks = cols * rows;
    let mut tiles = Vec::with_capacity(blocks as usize + 1);
    if blocks == 1 {
        tiles.push(resized);
    } else {
        for i in 0..blocks {
            let (x, y) = ((i % cols) * size, (i / cols) * size);
            tiles.push(imageops::crop_imm(&resized, x, y, size, size).to_image());
        }
    }
    if cfg.use_thumbnail && tiles.len() != 1 {
        tiles.push(resize_bicubic(img, size, size));
    }
    Ok((tiles, (cols, rows)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(min_tiles: u32, max_tiles: u32) -> ImageConfig {
        ImageConfig { min_tiles, max_tiles, ..ImageConfig::default() }
    }

    fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h
    }

    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

    #[test]
    fn tuple_hash_matches_cpython() {
        // hash((1, 1)), hash((1, 2)), hash((12, 1)) in CPython 3.11 (64-bit).
        assert_eq!(py_tuple_hash([1, 1]) as i64, 8_389_048_192_121_911_274);
        assert_eq!(py_tuple_hash([1, 2]) as i64, -3_550_055_125_485_641_917);
        assert_eq!(py_tuple_hash([12, 1]) as i64, -7_907_666_742_645_488_893);
    }

    #[test]
    fn target_ratio_order_matches_python() {
        let expected_1_12 = [
            (1, 1),
            (1, 2),
            (2, 1),
            (3, 1),
            (1, 3),
            (2, 2),
            (4, 1),
            (1, 4),
            (5, 1),
            (1, 5),
            (1, 6),
            (6, 1),
            (3, 2),
            (2, 3),
            (7, 1),
            (1, 7),
            (4, 2),
            (2, 4),
            (1, 8),
            (8, 1),
            (1, 9),
            (3, 3),
            (9, 1),
            (2, 5),
            (5, 2),
            (10, 1),
            (1, 10),
            (11, 1),
            (1, 11),
            (12, 1),
            (3, 4),
            (4, 3),
            (1, 12),
            (6, 2),
            (2, 6),
        ];
        assert_eq!(target_ratios(1, 12), expected_1_12);
        let expected_2_6 =
            [(1, 2), (2, 1), (3, 1), (1, 3), (4, 1), (1, 4), (2, 2), (1, 5), (5, 1), (6, 1), (2, 3), (1, 6), (3, 2)];
        assert_eq!(target_ratios(2, 6), expected_2_6);
        assert!(target_ratios(5, 4).is_empty());
    }

    /// FNV-1a over `min, max, i0, j0, i1, j1, ...` of every list for 1 <= min <= max <= 40,
    /// computed in CPython 3.11 with the literal reference expression:
    /// ```text
    /// for mn in range(1, 41):
    ///     for mx in range(mn, 41):
    ///         tr = sorted(set(...reference generator...), key=lambda x: x[0] * x[1])
    ///         h = fnv([mn, mx] + [v for t in tr for v in t], h)
    /// ```
    #[test]
    fn target_ratio_order_matches_python_for_all_ranges() {
        let mut h = FNV_OFFSET;
        for mn in 1..=40u32 {
            for mx in mn..=40u32 {
                let mut bytes = vec![mn as u8, mx as u8];
                for (i, j) in target_ratios(mn, mx) {
                    bytes.extend([i as u8, j as u8]);
                }
                h = fnv(h, &bytes);
            }
        }
        assert_eq!(h, 0xe932_e4ec_5c3e_a64d);
    }

    /// FNV-1a over `min, max, w (u32 LE), h (u32 LE), cols, rows` of the reference
    /// `find_closest_aspect_ratio` (image_size 448) for all 1 <= min <= max <= 40 and all
    /// pairs of the sizes below, computed in CPython 3.11.
    #[test]
    fn closest_grid_matches_python_exhaustively() {
        let sizes: [u32; 30] = [
            1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 16, 100, 224, 333, 447, 448, 449, 500, 600, 777, 800, 896, 1000,
            1344, 1600, 2000, 3000, 4000,
        ];
        let mut h = FNV_OFFSET;
        for mn in 1..=40u32 {
            for mx in mn..=40u32 {
                let ratios = target_ratios(mn, mx);
                for &w in &sizes {
                    for &hh in &sizes {
                        let aspect = f64::from(w) / f64::from(hh);
                        let (i, j) = find_closest_aspect_ratio(aspect, &ratios, w, hh, 448);
                        let mut bytes = vec![mn as u8, mx as u8];
                        bytes.extend(w.to_le_bytes());
                        bytes.extend(hh.to_le_bytes());
                        bytes.extend([i as u8, j as u8]);
                        h = fnv(h, &bytes);
                    }
                }
            }
        }
        assert_eq!(h, 0xc6b2_19fe_47bf_f441);
    }

    #[test]
    fn known_grids() {
        let d = ImageConfig::default();
        assert_eq!(closest_grid(448, 448, &d), (1, 1));
        assert_eq!(closest_grid(800, 600, &d), (4, 3));
        assert_eq!(closest_grid(600, 800, &d), (3, 4));
        assert_eq!(closest_grid(1600, 200, &d), (8, 1));
        assert_eq!(closest_grid(200, 1600, &d), (1, 8));
        assert_eq!(closest_grid(1, 500, &d), (1, 12));
        // Equal aspect ratio: a large image prefers the bigger grid, a small one the smaller.
        assert_eq!(closest_grid(1000, 1000, &d), (3, 3));
        assert_eq!(closest_grid(900, 900, &d), (2, 2));
        assert_eq!(closest_grid(10, 10, &d), (1, 1));
        assert_eq!(closest_grid(4000, 3000, &cfg(1, 40)), (4, 3));
        assert_eq!(closest_grid(800, 600, &cfg(1, 1)), (1, 1));
        assert_eq!(closest_grid(1920, 1080, &cfg(1, 6)), (2, 1));
    }

    /// `(min_tiles, max_tiles, width, height, expected grid)`.
    type TieCase = (u32, u32, u32, u32, (u32, u32));

    /// Every case (over 1 <= min <= max <= 40 and the midpoint aspect ratios of `(i, j)` /
    /// `(j, i)` pairs) where the answer depends on Python's set iteration order, with the
    /// answer CPython 3.11 gives.
    #[test]
    fn set_order_tie_breaks_match_python() {
        #[rustfmt::skip]
        let cases: &[TieCase] = &[
            (2, 2, 5, 4, (1, 2)),
            (2, 2, 250, 200, (1, 2)),
            (2, 2, 2000, 1600, (2, 1)),
            (2, 2, 10000, 8000, (2, 1)),
            (2, 3, 5, 4, (1, 2)),
            (2, 3, 250, 200, (1, 2)),
            (2, 3, 2000, 1600, (2, 1)),
            (2, 3, 10000, 8000, (2, 1)),
            (5, 5, 13, 5, (5, 1)),
            (5, 5, 650, 250, (5, 1)),
            (5, 5, 5200, 2000, (1, 5)),
            (7, 8, 5, 4, (2, 4)),
            (7, 8, 250, 200, (2, 4)),
            (7, 8, 2000, 1600, (4, 2)),
            (7, 8, 10000, 8000, (4, 2)),
            (8, 8, 5, 4, (2, 4)),
            (8, 8, 250, 200, (2, 4)),
            (8, 8, 2000, 1600, (4, 2)),
            (8, 8, 10000, 8000, (4, 2)),
            (13, 13, 85, 13, (1, 13)),
            (13, 13, 4250, 650, (13, 1)),
            (13, 13, 34000, 5200, (13, 1)),
            (13, 14, 53, 28, (2, 7)),
            (13, 14, 2650, 1400, (7, 2)),
            (14, 14, 53, 28, (7, 2)),
            (14, 14, 2650, 1400, (2, 7)),
            (17, 17, 145, 17, (1, 17)),
            (17, 17, 7250, 850, (17, 1)),
            (17, 18, 5, 4, (3, 6)),
            (17, 18, 250, 200, (3, 6)),
            (17, 18, 2000, 1600, (6, 3)),
            (17, 18, 10000, 8000, (6, 3)),
            (17, 19, 5, 4, (3, 6)),
            (17, 19, 250, 200, (3, 6)),
            (17, 19, 2000, 1600, (6, 3)),
            (17, 19, 10000, 8000, (6, 3)),
            (18, 18, 5, 4, (3, 6)),
            (18, 18, 250, 200, (3, 6)),
            (18, 18, 2000, 1600, (6, 3)),
            (18, 18, 10000, 8000, (6, 3)),
            (18, 19, 5, 4, (3, 6)),
            (18, 19, 250, 200, (3, 6)),
            (18, 19, 2000, 1600, (6, 3)),
            (18, 19, 10000, 8000, (6, 3)),
            (22, 22, 125, 44, (11, 2)),
            (22, 22, 6250, 2200, (2, 11)),
            (22, 23, 125, 44, (11, 2)),
            (22, 23, 6250, 2200, (2, 11)),
            (29, 29, 421, 29, (1, 29)),
            (29, 29, 21050, 1450, (29, 1)),
            (31, 32, 5, 4, (8, 4)),
            (31, 32, 250, 200, (8, 4)),
            (31, 32, 2000, 1600, (8, 4)),
            (31, 32, 10000, 8000, (4, 8)),
            (31, 33, 5, 4, (8, 4)),
            (31, 33, 250, 200, (8, 4)),
            (31, 33, 2000, 1600, (8, 4)),
            (31, 33, 10000, 8000, (4, 8)),
            (31, 34, 5, 4, (8, 4)),
            (31, 34, 250, 200, (8, 4)),
            (31, 34, 2000, 1600, (8, 4)),
            (31, 34, 10000, 8000, (4, 8)),
            (32, 32, 5, 4, (8, 4)),
            (32, 32, 250, 200, (8, 4)),
            (32, 32, 2000, 1600, (8, 4)),
            (32, 32, 10000, 8000, (4, 8)),
            (32, 33, 5, 4, (8, 4)),
            (32, 33, 250, 200, (8, 4)),
            (32, 33, 2000, 1600, (8, 4)),
            (32, 33, 10000, 8000, (4, 8)),
            (32, 34, 5, 4, (8, 4)),
            (32, 34, 250, 200, (8, 4)),
            (32, 34, 2000, 1600, (8, 4)),
            (32, 34, 10000, 8000, (4, 8)),
            (34, 34, 293, 68, (17, 2)),
            (34, 34, 14650, 3400, (2, 17)),
            (37, 39, 89, 39, (13, 3)),
            (37, 39, 4450, 1950, (3, 13)),
            (37, 40, 89, 80, (5, 8)),
            (37, 40, 4450, 4000, (8, 5)),
            (38, 39, 89, 39, (13, 3)),
            (38, 39, 4450, 1950, (3, 13)),
            (38, 40, 89, 80, (5, 8)),
            (38, 40, 4450, 4000, (8, 5)),
            (39, 39, 89, 39, (3, 13)),
            (39, 39, 4450, 1950, (13, 3)),
            (39, 40, 89, 80, (5, 8)),
            (39, 40, 4450, 4000, (8, 5)),
            (40, 40, 89, 80, (5, 8)),
            (40, 40, 4450, 4000, (8, 5)),
        ];
        for &(mn, mx, w, h, want) in cases {
            assert_eq!(closest_grid(w, h, &cfg(mn, mx)), want, "min {mn} max {mx} {w}x{h}");
        }
    }

    #[test]
    fn tiles_and_thumbnail() {
        let img = RgbImage::from_fn(800, 600, |x, y| ::image::Rgb([x as u8, y as u8, 1]));
        let (tiles, grid) = tile_images(&img, &ImageConfig::default()).unwrap();
        assert_eq!(grid, (4, 3));
        assert_eq!(tiles.len(), 13);
        assert!(tiles.iter().all(|t| t.dimensions() == (448, 448)));
        let resized = resize_bicubic(&img, 4 * 448, 3 * 448);
        // Tile 5 is column 1, row 1.
        assert_eq!(tiles[5].get_pixel(0, 0), resized.get_pixel(448, 448));
        assert_eq!(tiles[12], resize_bicubic(&img, 448, 448));

        let no_thumb = ImageConfig { use_thumbnail: false, ..ImageConfig::default() };
        assert_eq!(tile_images(&img, &no_thumb).unwrap().0.len(), 12);
        // A single tile gets no thumbnail.
        let (one, grid) = tile_images(&img, &cfg(1, 1)).unwrap();
        assert_eq!((one.len(), grid), (1, (1, 1)));
    }

    #[test]
    fn invalid_configs_are_errors() {
        let img = RgbImage::new(4, 4);
        for c in [cfg(0, 12), cfg(3, 2), cfg(1, MAX_TILES_LIMIT + 1)] {
            let err = tile_images(&img, &c).unwrap_err().to_string();
            assert!(err.contains("invalid tile range"), "{err}");
        }
        let c = ImageConfig { image_size: 0, ..ImageConfig::default() };
        assert!(tile_images(&img, &c).unwrap_err().to_string().contains("invalid tile size"));
        let err = tile_images(&RgbImage::new(0, 5), &ImageConfig::default()).unwrap_err();
        assert!(err.to_string().contains("empty"));
    }
}
