//! The OpenAI response bodies this server sends, as types: a completion, a stream chunk, usage, the model
//! list and the error envelope. Field names and `null`s are the API's (the official SDKs parse them);
//! `timings` is llama-server's extra block, which clients ignore.

use internvl::{FinishReason, Output};
use serde::Serialize;

/// `system_fingerprint`: the server build that answered.
pub fn fingerprint() -> String {
    format!("internvl-{}", env!("CARGO_PKG_VERSION"))
}

/// What every completion and chunk of one request repeats.
pub struct Reply {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub tokens_per_tile: usize,
}

/// The fields every completion and chunk begins with.
#[derive(Serialize)]
pub struct Head<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub system_fingerprint: String,
}

#[derive(Serialize)]
pub struct ChatCompletion<'a> {
    #[serde(flatten)]
    pub head: Head<'a>,
    pub choices: [Choice; 1],
    pub usage: Usage,
    pub timings: Timings,
}

#[derive(Serialize)]
pub struct Choice {
    pub index: u32,
    pub message: Message,
    pub logprobs: Option<()>,
    pub finish_reason: &'static str,
}

#[derive(Serialize)]
pub struct Message {
    pub role: &'static str,
    pub content: String,
}

#[derive(Serialize)]
pub struct ChatCompletionChunk<'a> {
    #[serde(flatten)]
    pub head: Head<'a>,
    pub choices: Vec<ChunkChoice>,
    pub usage: Option<Usage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timings: Option<Timings>,
}

#[derive(Serialize)]
pub struct ChunkChoice {
    pub index: u32,
    pub delta: Delta,
    pub logprobs: Option<()>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Serialize, Default)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
    pub image_tokens: usize,
}

/// Where the request's time went: milliseconds from the request's start, and rates.
#[derive(Serialize)]
pub struct Timings {
    pub preprocess_ms: f64,
    pub vision_ms: f64,
    pub prefill_ms: f64,
    pub first_token_ms: f64,
    pub decode_ms: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub tiles: usize,
}

#[derive(Serialize)]
pub struct ModelList<'a> {
    pub object: &'static str,
    pub data: [ModelCard<'a>; 1],
}

#[derive(Serialize)]
pub struct ModelCard<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    pub context_length: usize,
}

#[derive(Serialize)]
pub struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
}

#[derive(Serialize)]
pub struct ErrorDetail<'a> {
    pub message: &'a str,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub param: Option<&'a str>,
    pub code: Option<&'a str>,
}

/// OpenAI's finish reasons: a cancelled request has no client left to read it, so it reads as cut short.
pub fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::Cancelled => "length",
    }
}

impl Usage {
    pub fn of(out: &Output, tokens_per_tile: usize) -> Self {
        Self {
            prompt_tokens: out.prompt_tokens,
            completion_tokens: out.generated_tokens,
            total_tokens: out.prompt_tokens + out.generated_tokens,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: out.cached_tokens,
                image_tokens: out.tiles * tokens_per_tile,
            },
        }
    }
}

impl Timings {
    pub fn of(out: &Output) -> Self {
        let t = &out.timings;
        // A rate over no time (no decode step) is not a number JSON can carry.
        let finite = |x: f64| if x.is_finite() { x } else { 0.0 };
        Self {
            preprocess_ms: t.preprocess_ms,
            vision_ms: t.vision_ms,
            prefill_ms: t.prefill_ms,
            first_token_ms: t.first_token_ms,
            decode_ms: t.decode_ms,
            prefill_tokens_per_s: finite(t.prefill_tokens_per_s),
            decode_tokens_per_s: finite(t.decode_tokens_per_s),
            tiles: out.tiles,
        }
    }
}

impl Reply {
    pub fn completion(&self, out: &Output) -> ChatCompletion<'_> {
        ChatCompletion {
            head: self.head("chat.completion"),
            choices: [Choice {
                index: 0,
                message: Message { role: "assistant", content: out.text.clone() },
                logprobs: None,
                finish_reason: finish_reason(out.finish_reason),
            }],
            usage: Usage::of(out, self.tokens_per_tile),
            timings: Timings::of(out),
        }
    }

    /// A chunk of the one choice: `delta`, and its finish reason on the last.
    pub fn chunk(&self, delta: Delta, finish_reason: Option<&'static str>) -> ChatCompletionChunk<'_> {
        let choice = ChunkChoice { index: 0, delta, logprobs: None, finish_reason };
        self.chunk_of(vec![choice], None, None)
    }

    /// The stream's last chunk with `include_usage`: no choices, the usage and timings.
    pub fn usage_chunk(&self, out: &Output) -> ChatCompletionChunk<'_> {
        self.chunk_of(Vec::new(), Some(Usage::of(out, self.tokens_per_tile)), Some(Timings::of(out)))
    }

    fn chunk_of(
        &self,
        choices: Vec<ChunkChoice>,
        usage: Option<Usage>,
        timings: Option<Timings>,
    ) -> ChatCompletionChunk<'_> {
        ChatCompletionChunk { head: self.head("chat.completion.chunk"), choices, usage, timings }
    }

    fn head(&self, object: &'static str) -> Head<'_> {
        Head { id: &self.id, object, created: self.created, model: &self.model, system_fingerprint: fingerprint() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn reply() -> Reply {
        Reply { id: "chatcmpl-1".into(), created: 7, model: "m".into(), tokens_per_tile: 256 }
    }

    fn output() -> Output {
        Output {
            text: "hi".into(),
            token_ids: vec![1, 2],
            prompt_tokens: 300,
            cached_tokens: 10,
            generated_tokens: 2,
            tiles: 1,
            finish_reason: FinishReason::Stop,
            timings: internvl::engine::Timings {
                load_ms: 1.0,
                preprocess_ms: 2.0,
                vision_ms: 3.0,
                prefill_ms: 4.0,
                first_token_ms: 5.0,
                decode_ms: 0.0,
                prefill_tokens_per_s: 10.0,
                decode_tokens_per_s: f64::INFINITY,
            },
            logits: Vec::new(),
            media: Vec::new(),
        }
    }

    fn value(v: &impl Serialize) -> Value {
        serde_json::to_value(v).unwrap()
    }

    #[test]
    fn chunks_carry_the_api_fields_and_nulls() {
        let r = reply();
        let first = value(&r.chunk(Delta { role: Some("assistant"), content: Some(String::new()) }, None));
        assert_eq!(
            first,
            json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m",
                   "system_fingerprint": fingerprint(), "usage": null,
                   "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null,
                                "finish_reason": null}]})
        );
        let last = value(&r.chunk(Delta::default(), Some("stop")));
        assert_eq!(last["choices"][0]["delta"], json!({}));
        assert_eq!(last["choices"][0]["finish_reason"], "stop");
        assert!(last.get("timings").is_none());
        let usage = value(&r.usage_chunk(&output()));
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["prompt_tokens_details"], json!({"cached_tokens": 10, "image_tokens": 256}));
        assert_eq!(usage["timings"]["decode_tokens_per_s"], 0.0, "a rate over no time is sent as 0");
    }

    #[test]
    fn a_completion_has_one_choice_usage_and_timings() {
        let v = value(&reply().completion(&output()));
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(
            v["choices"],
            json!([{"index": 0, "message": {"role": "assistant", "content": "hi"}, "logprobs": null,
                    "finish_reason": "stop"}])
        );
        assert_eq!(v["usage"]["total_tokens"], 302);
        assert_eq!(v["timings"]["tiles"], 1);
    }
}
