//! One module per `internvl` command: its flags (a clap `Args` struct) and what it does.

pub mod bench;
pub mod chat;
pub mod devices;
pub mod embed;
pub mod info;
pub mod package;
pub mod preprocess;
pub mod run;
pub mod serve;
pub mod tokenize;
