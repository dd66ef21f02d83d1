//! Next-token choice: greedy by default, or seeded sampling with the usual logit processors, applied
//! in the order transformers' `generate` applies them (repetition penalty, temperature, top-k, top-p).

use anyhow::{ensure, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone)]
pub struct SamplingOptions {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1.0 = off.
    pub top_p: f32,
    /// 1.0 = off.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: 0 }
    }
}

impl SamplingOptions {
    /// The parameters' rules; messages name them as the API and the flags do (`temperature`, `top_p`).
    pub fn validate(&self) -> Result<()> {
        check_temperature(self.temperature)?;
        check_top_p(self.top_p)?;
        check_repetition_penalty(self.repetition_penalty)
    }
}

pub fn check_temperature(t: f32) -> Result<()> {
    ensure!(t >= 0.0 && t.is_finite(), "temperature {t} must be a finite number >= 0");
    Ok(())
}

pub fn check_top_p(p: f32) -> Result<()> {
    ensure!(p > 0.0 && p <= 1.0, "top_p {p} must be in (0, 1]");
    Ok(())
}

pub fn check_repetition_penalty(r: f32) -> Result<()> {
    ensure!(r > 0.0 && r.is_finite(), "repetition_penalty {r} must be a finite number > 0");
    Ok(())
}

pub struct Sampler {
    opts: SamplingOptions,
    rng: StdRng,
}

impl Sampler {
    pub fn new(opts: SamplingOptions) -> Self {
        let rng = StdRng::seed_from_u64(opts.seed);
        Self { opts, rng }
    }

    /// Picks the next token from `logits`; `context` is every token id so far (prompt included, as
    /// transformers' repetition penalty sees it).
    pub fn next(&mut self, logits: &mut [f32], context: &[u32]) -> u32 {
        let o = &self.opts;
        if o.repetition_penalty != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &t in context {
                let t = t as usize;
                if t < logits.len() && !seen[t] {
                    seen[t] = true;
                    let l = &mut logits[t];
                    *l = if *l < 0.0 { *l * o.repetition_penalty } else { *l / o.repetition_penalty };
                }
            }
        }
        if o.temperature == 0.0 {
            return argmax(logits);
        }
        // In f64 and by division: 1 / T overflows f32 for a tiny temperature (1e-40), and inf x 0 is NaN;
        // here the scaled logits stay finite and the choice tends to greedy, as the limit T -> 0 does.
        let t = f64::from(o.temperature);
        let mut cand: Vec<(u32, f64)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, f64::from(l) / t)).collect();
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if o.top_k > 0 && o.top_k < cand.len() {
            cand.truncate(o.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f64> = cand.iter().map(|c| (c.1 - max).exp()).collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if o.top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p (at least one token).
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= o.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let s: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= s);
        }
        let mut r: f64 = self.rng.gen();
        for (i, p) in probs.iter().enumerate() {
            if r < *p {
                return cand[i].0;
            }
            r -= p;
        }
        cand[probs.len() - 1].0
    }
}

/// First index of the maximum, as `torch.argmax` breaks ties.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn same_seed_same_tokens() {
        let opts = SamplingOptions { temperature: 1.0, top_p: 0.9, top_k: 50, seed: 7, ..Default::default() };
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let run = |o: SamplingOptions| {
            let mut s = Sampler::new(o);
            (0..20).map(|_| s.next(&mut logits.clone(), &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(opts.clone()), run(opts.clone()));
        assert_ne!(run(opts.clone()), run(SamplingOptions { seed: 8, ..opts }));
    }

    #[test]
    fn tiny_temperature_is_greedy_not_nan() {
        let mut s = Sampler::new(SamplingOptions { temperature: 1e-40, seed: 3, ..Default::default() });
        let logits = vec![0.1, 0.5, 2.0, 1.9, -3.0];
        for _ in 0..20 {
            assert_eq!(s.next(&mut logits.clone(), &[]), 2);
        }
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(SamplingOptions { temperature: 5.0, top_k: 1, ..Default::default() });
        let logits = vec![0.1, 0.5, 2.0, 1.9];
        for _ in 0..10 {
            assert_eq!(s.next(&mut logits.clone(), &[]), 2);
        }
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let mut s = Sampler::new(SamplingOptions { repetition_penalty: 2.0, ..Default::default() });
        assert_eq!(s.next(&mut [1.0, 1.5, 0.5], &[1]), 0);
        // Negative logits are multiplied, not divided.
        assert_eq!(s.next(&mut [-1.0, -0.6, -2.0], &[1]), 0);
    }
}
