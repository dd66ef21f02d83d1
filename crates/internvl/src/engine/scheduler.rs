//! Who runs where and when, as plain data: which KV-cache row a waiting prompt gets and how much of its
//! prefix that row already holds, which sequence gets the next prefill chunk, and which decoding rows
//! step together in one decoder call. No ONNX Runtime here: the engine carries these decisions out, and
//! the tests below check them without a model.

use crate::media::MediaKey;

/// Answer positions the KV cache is sized for before decoding (the manifest's default answer length): a
/// large `max_new_tokens` does not allocate the whole context's cache for an answer that stops after a
/// sentence; longer ones grow it.
pub const RESERVE_AHEAD: usize = 1024;

/// What a KV-cache row holds: the ids its positions were computed from, the images among them, and how.
#[derive(Debug, Default)]
struct Row {
    ids: Vec<u32>,
    media: Vec<MediaKey>,
    /// LongRoPE: the positions were computed with the short factors.
    short_rope: bool,
    busy: bool,
}

/// A prompt as admission sees it: its ids, and where each image's tokens start with the image's key.
pub struct Prompt<'a> {
    pub ids: &'a [u32],
    pub images: &'a [(usize, MediaKey)],
}

/// Where an admitted prompt runs: row `row`, whose first `keep` positions it shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub row: usize,
    pub keep: usize,
}

pub struct Scheduler {
    rows: Vec<Row>,
    /// One row per decoder call and no prefix reuse: every answer equal to its solo run where rows are
    /// not computed independently (see `EngineConfig::exact`).
    solo: bool,
    /// LongRoPE: positions past this use the long factors (the manifest's `long_rope_after`).
    long_rope_after: Option<usize>,
}

impl Scheduler {
    pub fn new(rows: usize, solo: bool, long_rope_after: Option<usize>) -> Self {
        Self { rows: (0..rows).map(|_| Row::default()).collect(), solo, long_rope_after }
    }

    /// Gives `prompt` the free row whose cache shares the longest prefix with it (the lowest such row
    /// on a tie), or None when every row is busy. The row is then busy and holds the kept prefix.
    pub fn admit(&mut self, prompt: &Prompt) -> Option<Placement> {
        let (row, keep) = (0..self.rows.len())
            .filter(|&r| !self.rows[r].busy)
            .map(|r| (r, self.shared_prefix(prompt, r)))
            .max_by_key(|&(r, keep)| (keep, std::cmp::Reverse(r)))?;
        let short = self.long_rope_after.is_some_and(|a| prompt.ids.len() <= a);
        let r = &mut self.rows[row];
        r.busy = true;
        r.ids.truncate(keep);
        r.media = prompt.images.iter().map(|&(_, key)| key).collect();
        if keep == 0 {
            r.short_rope = short;
        }
        Some(Placement { row, keep })
    }

    /// Prompt positions that row `r`'s cache already holds: equal ids, and the same images wherever those
    /// ids are image tokens; at least the last position runs (for its logits).
    pub fn shared_prefix(&self, prompt: &Prompt, r: usize) -> usize {
        if self.solo {
            return 0; // a partial prefill quantises differently from the whole prompt's
        }
        let row = &self.rows[r];
        let same = row.ids.iter().zip(prompt.ids).take_while(|(a, b)| a == b).count();
        // Image tokens are the same ids for every image: the prefix ends at the first image that differs.
        let mut end = same;
        for (j, &(first, key)) in prompt.images.iter().enumerate() {
            if first >= end {
                break;
            }
            if row.media.get(j) != Some(&key) {
                end = first;
                break;
            }
        }
        // LongRoPE: the reference runs a prompt past the switch point with the long factors throughout.
        if row.short_rope && self.long_rope(prompt.ids.len()) {
            return 0;
        }
        end.min(prompt.ids.len().saturating_sub(1))
    }

    /// Records that row `r` computed the positions of `ids` (after those it held).
    pub fn ran(&mut self, r: usize, ids: &[u32]) {
        self.rows[r].ids.extend_from_slice(ids);
    }

    /// Frees row `r`; its cache keeps what it holds for the next prompt that shares it.
    pub fn release(&mut self, r: usize) {
        self.rows[r].busy = false;
    }

    /// Forgets what row `r` holds (after a failed call its cache's state is unknown).
    pub fn forget(&mut self, r: usize) {
        self.rows[r].ids.clear();
        self.rows[r].media.clear();
    }

    /// Whether a forward call whose last position is `last` (1-based count of positions) uses LongRoPE's
    /// long factors: transformers decides once per call, from its last position.
    pub fn long_rope(&self, last: usize) -> bool {
        self.long_rope_after.is_some_and(|a| last > a)
    }

    /// The decoder calls of one decode step: `decoding` holds each decoding sequence's index and its
    /// row's cache length; a group is the indices that run in one call, and whether with long factors.
    /// Rows step together unless `solo`; short and long LongRoPE factors never share a call.
    pub fn decode_groups(&self, decoding: &[(usize, usize)]) -> Vec<(Vec<usize>, bool)> {
        let mut calls = Vec::new();
        for long in [false, true] {
            let group: Vec<usize> =
                decoding.iter().filter(|&&(_, len)| self.long_rope(len + 1) == long).map(|&(i, _)| i).collect();
            if group.is_empty() {
                continue;
            }
            if self.solo {
                calls.extend(group.into_iter().map(|i| (vec![i], long)));
            } else {
                calls.push((group, long));
            }
        }
        calls
    }
}

/// The sequence that gets the next prefill chunk: the one served longest ago (then the oldest), from
/// `(index, last served step, sequence id)` of those waiting for one.
pub fn next_prefill(candidates: impl Iterator<Item = (usize, u64, u64)>) -> Option<usize> {
    candidates.min_by_key(|&(_, served, id)| (served, id)).map(|(i, _, _)| i)
}

/// KV-cache positions to reserve for a prompt of `prompt_len` with an answer budget of `budget`.
pub fn reserve(prompt_len: usize, budget: usize) -> usize {
    prompt_len + budget.min(RESERVE_AHEAD)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> MediaKey {
        MediaKey { sha256: [n; 32], max_tiles: 12 }
    }

    fn admit(s: &mut Scheduler, ids: &[u32], images: &[(usize, MediaKey)]) -> Option<Placement> {
        s.admit(&Prompt { ids, images })
    }

    #[test]
    fn rows_fill_in_order_then_admission_waits() {
        let mut s = Scheduler::new(2, false, None);
        assert_eq!(admit(&mut s, &[1, 2, 3], &[]), Some(Placement { row: 0, keep: 0 }));
        assert_eq!(admit(&mut s, &[4, 5], &[]), Some(Placement { row: 1, keep: 0 }));
        assert_eq!(admit(&mut s, &[6], &[]), None, "both rows busy");
        s.release(1);
        assert_eq!(admit(&mut s, &[6], &[]).map(|p| p.row), Some(1));
    }

    #[test]
    fn a_prompt_goes_to_the_row_sharing_its_longest_prefix() {
        let mut s = Scheduler::new(3, false, None);
        for (r, ids) in [[9, 9, 9, 9], [1, 2, 3, 4], [1, 2, 7, 7]].iter().enumerate() {
            assert_eq!(admit(&mut s, ids, &[]).map(|p| p.row), Some(r));
            s.ran(r, ids);
        }
        for r in 0..3 {
            s.release(r);
        }
        assert_eq!(admit(&mut s, &[1, 2, 3, 4, 5, 6], &[]), Some(Placement { row: 1, keep: 4 }));
        assert_eq!(admit(&mut s, &[1, 2, 7, 8], &[]), Some(Placement { row: 2, keep: 3 }));
    }

    #[test]
    fn the_last_prompt_position_always_runs_for_its_logits() {
        let mut s = Scheduler::new(1, false, None);
        admit(&mut s, &[1, 2, 3], &[]);
        s.ran(0, &[1, 2, 3, 10, 11]);
        s.release(0);
        assert_eq!(admit(&mut s, &[1, 2, 3], &[]), Some(Placement { row: 0, keep: 2 }));
    }

    #[test]
    fn a_different_image_ends_the_shared_prefix_at_its_first_token() {
        // Same ids (image tokens are one id for every image), image at position 2.
        let ids = [1, 2, 50, 50, 50, 3, 4];
        let mut s = Scheduler::new(1, false, None);
        admit(&mut s, &ids, &[(2, key(1))]);
        s.ran(0, &ids);
        s.release(0);
        assert_eq!(s.shared_prefix(&Prompt { ids: &ids, images: &[(2, key(1))] }, 0), 6);
        assert_eq!(s.shared_prefix(&Prompt { ids: &ids, images: &[(2, key(2))] }, 0), 2);
    }

    #[test]
    fn exact_mode_reuses_no_prefix_and_decodes_rows_one_per_call() {
        let mut s = Scheduler::new(2, true, None);
        admit(&mut s, &[1, 2, 3], &[]);
        s.ran(0, &[1, 2, 3]);
        s.release(0);
        assert_eq!(admit(&mut s, &[1, 2, 3, 4], &[]), Some(Placement { row: 0, keep: 0 }));
        assert_eq!(s.decode_groups(&[(0, 10), (1, 12)]), vec![(vec![0], false), (vec![1], false)]);
        let batched = Scheduler::new(2, false, None);
        assert_eq!(batched.decode_groups(&[(0, 10), (1, 12)]), vec![(vec![0, 1], false)]);
    }

    #[test]
    fn long_rope_splits_decode_calls_and_drops_short_factor_prefixes() {
        let mut s = Scheduler::new(2, false, Some(8));
        // Cache lengths 7 and 8: the next positions are 8 (short) and 9 (long).
        assert_eq!(s.decode_groups(&[(0, 7), (1, 8)]), vec![(vec![0], false), (vec![1], true)]);
        // A row computed with short factors is not reused by a prompt past the switch.
        let short: Vec<u32> = (0..6).collect();
        admit(&mut s, &short, &[]);
        s.ran(0, &short);
        s.release(0);
        let long: Vec<u32> = (0..10).collect();
        assert_eq!(s.shared_prefix(&Prompt { ids: &long, images: &[] }, 0), 0);
        let also_short: Vec<u32> = (0..8).collect();
        assert_eq!(s.shared_prefix(&Prompt { ids: &also_short, images: &[] }, 0), 6);
    }

    #[test]
    fn prefill_goes_round_robin_and_reserve_is_bounded() {
        assert_eq!(next_prefill([(0, 5, 1), (1, 3, 2), (2, 3, 0)].into_iter()), Some(2));
        assert_eq!(next_prefill(std::iter::empty()), None);
        assert_eq!(reserve(100, 10), 110);
        assert_eq!(reserve(100, 1 << 20), 100 + RESERVE_AHEAD);
    }

    #[test]
    fn a_forgotten_row_shares_nothing() {
        let mut s = Scheduler::new(1, false, None);
        admit(&mut s, &[1, 2, 3], &[]);
        s.ran(0, &[1, 2, 3]);
        s.forget(0);
        s.release(0);
        assert_eq!(admit(&mut s, &[1, 2, 3, 4], &[]), Some(Placement { row: 0, keep: 0 }));
    }
}
