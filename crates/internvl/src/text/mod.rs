//! Text in and out: the conversation template and `<image>` expansion ([`prompt`]), the tokenizer and
//! the answer stream that turns generated ids into text pieces ([`tokenizer`]).

pub mod prompt;
pub mod stop;
pub mod tokenizer;
