//! What only the command line needs: the benchmark behind `internvl bench`.

pub mod bench;
