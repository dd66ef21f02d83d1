//! InternVL image preprocessing, reproducing the model card's `load_image` byte for byte.
//!
//! The reference pipeline is Python: `Image.open(f).convert('RGB')`, `dynamic_preprocess`
//! (choose a tile grid, one Pillow BICUBIC resize to the grid, crop 448x448 tiles, add a
//! thumbnail) and the torchvision transform (`ToTensor` + `Normalize`). The vision encoder was
//! trained on exactly those pixels, so every step here mirrors the Python/Pillow arithmetic
//! rather than using a "nicer" resampler:
//!
//! * [`decode`]: file -> `RgbImage` with Pillow's mode conversion rules (alpha dropped, not
//!   composited; 16-bit data reduced the way Pillow does it).
//! * [`resize`]: Pillow's fixed-point two-pass BICUBIC resampler.
//! * [`tiling`]: grid choice including CPython's set iteration order used as a tie-break.
//! * [`normalize`]: float32 `(x / 255 - mean) / std` with the same IEEE operations as torch.

mod decode;
mod jpeg;
mod normalize;
mod resize;
mod tiling;

use ::image::RgbImage;
use anyhow::{ensure, Result};

pub use decode::{decode_image, dimensions_of, image_dimensions, load_image, MAX_IMAGE_PIXELS};
pub use normalize::normalize_into;
pub use resize::resize_bicubic;
pub use tiling::{closest_grid, find_closest_aspect_ratio, target_ratios, tile_count, tile_images, MAX_TILES_LIMIT};

/// Most tiles per image a request may ask for (`--max-tiles`), as the reference's `max_num` is used.
pub const MAX_TILES: u32 = 40;

/// ImageNet channel means used by InternVL's `build_transform`.
///
/// Written as `f64 as f32` on purpose: torch/numpy build the float32 tensor from the Python
/// (double) literal, i.e. decimal -> f64 -> f32. Rounding the decimal straight to f32 could
/// differ in the last bit for some constants.
pub const IMAGENET_MEAN: [f32; 3] = [0.485_f64 as f32, 0.456_f64 as f32, 0.406_f64 as f32];
/// ImageNet channel standard deviations (see [`IMAGENET_MEAN`] for why `f64 as f32`).
pub const IMAGENET_STD: [f32; 3] = [0.229_f64 as f32, 0.224_f64 as f32, 0.225_f64 as f32];

/// Parameters of `dynamic_preprocess` + `build_transform` (also the manifest's `image` section).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct ImageConfig {
    /// Tile edge in pixels (`input_size`, 448 for all InternVL2/2.5/3 models).
    pub image_size: u32,
    /// `min_num`: smallest allowed number of tiles in the grid.
    pub min_tiles: u32,
    /// `max_num`: largest allowed number of tiles in the grid.
    pub max_tiles: u32,
    /// Append a whole-image thumbnail when the grid has more than one tile.
    pub use_thumbnail: bool,
    /// Per-channel mean subtracted after scaling to [0, 1].
    pub mean: [f32; 3],
    /// Per-channel standard deviation divided by after subtracting the mean.
    pub std: [f32; 3],
}

impl Default for ImageConfig {
    fn default() -> Self {
        Self {
            image_size: 448,
            min_tiles: 1,
            max_tiles: 12,
            use_thumbnail: true,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }
}

/// Normalised tiles ready for the vision encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct Tiles {
    /// float32 pixels in NCHW order, shape `[count, 3, size, size]`.
    pub data: Vec<f32>,
    /// Number of tiles, thumbnail included.
    pub count: usize,
    /// Chosen grid as `(cols, rows)`; the thumbnail is not part of it.
    pub grid: (u32, u32),
    /// Tile edge in pixels.
    pub size: u32,
}

impl Tiles {
    /// Tensor shape `[count, 3, size, size]`, e.g. for writing an `.npy` file.
    pub fn shape(&self) -> [usize; 4] {
        let s = self.size as usize;
        [self.count, 3, s, s]
    }
}

/// Full reference preprocessing of an already decoded image: tiling, then normalisation.
pub fn preprocess(img: &RgbImage, cfg: &ImageConfig) -> Result<Tiles> {
    let (tiles, grid) = tile_images(img, cfg)?;
    let size = cfg.image_size;
    let plane = size as usize * size as usize;
    let mut data = vec![0.0f32; tiles.len() * 3 * plane];
    for (tile, out) in tiles.iter().zip(data.chunks_exact_mut(3 * plane)) {
        ensure!(
            tile.dimensions() == (size, size),
            "internal error: tile is {}x{}, expected {size}x{size}",
            tile.width(),
            tile.height()
        );
        normalize_into(tile, &cfg.mean, &cfg.std, out);
    }
    Ok(Tiles { data, count: tiles.len(), grid, size })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_matches_reference() {
        let cfg = ImageConfig::default();
        assert_eq!(cfg.image_size, 448);
        assert_eq!((cfg.min_tiles, cfg.max_tiles), (1, 12));
        assert!(cfg.use_thumbnail);
        // Bit patterns of np.array((0.485, 0.456, 0.406), np.float32) etc.
        assert_eq!(cfg.mean.map(f32::to_bits), [0x3EF8_51EC, 0x3EE9_78D5, 0x3ECF_DF3B]);
        assert_eq!(cfg.std.map(f32::to_bits), [0x3E6A_7EFA, 0x3E65_6042, 0x3E66_6666]);
    }

    #[test]
    fn preprocess_shapes() {
        let img = RgbImage::from_fn(800, 600, |x, y| ::image::Rgb([x as u8, y as u8, 7]));
        let t = preprocess(&img, &ImageConfig::default()).unwrap();
        assert_eq!(t.grid, (4, 3));
        assert_eq!(t.count, 13);
        assert_eq!(t.shape(), [13, 3, 448, 448]);
        assert_eq!(t.data.len(), 13 * 3 * 448 * 448);

        let small = RgbImage::new(10, 10);
        let t = preprocess(&small, &ImageConfig::default()).unwrap();
        assert_eq!((t.grid, t.count), ((1, 1), 1));
    }
}
