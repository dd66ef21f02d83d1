//! What only the command line needs: the benchmark behind `internvl bench`, the edge bundle behind
//! `internvl package`.

pub mod bench;
pub mod package;
