//! Stop strings: the answer ends before the first of them, and text that could be the start of one is
//! held back while it streams.

/// Holds back answer text that could be the start of a stop string, and cuts the answer where one
/// appears.
#[derive(Default)]
pub struct StopFilter {
    stops: Vec<String>,
    text: String,
    shown: usize,
}

impl StopFilter {
    pub fn new(stops: &[String]) -> Self {
        Self { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), text: String::new(), shown: 0 }
    }

    /// Adds answer text; returns what can be shown now and whether a stop string ended the answer.
    pub fn push(&mut self, piece: &str) -> (Option<String>, bool) {
        self.text.push_str(piece);
        if self.stops.is_empty() {
            return (self.take(self.text.len()), false);
        }
        let hit = self.stops.iter().filter_map(|s| self.text[self.shown..].find(s.as_str())).min();
        if let Some(at) = hit {
            let end = self.shown + at;
            let piece = self.take(end);
            self.text.truncate(end);
            return (piece, true);
        }
        // The longest tail that begins some stop string stays back.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if self.text.ends_with(&s[..i]) {
                    keep = keep.max(i);
                }
            }
        }
        let end = (self.text.len() - keep).max(self.shown);
        (self.take(end), false)
    }

    /// Everything not shown yet (the answer ended without a stop string).
    pub fn finish(&mut self) -> Option<String> {
        self.take(self.text.len())
    }

    /// The answer so far (cut at a stop string once one appeared).
    pub fn text(&self) -> &str {
        &self.text
    }

    fn take(&mut self, end: usize) -> Option<String> {
        if end <= self.shown {
            return None;
        }
        let piece = self.text[self.shown..end].to_string();
        self.shown = end;
        Some(piece)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut f = StopFilter::new(&stops.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let mut shown = String::new();
        for p in pieces {
            let (piece, hit) = f.push(p);
            shown.extend(piece);
            if hit {
                assert_eq!(shown, f.text());
                return (shown, true);
            }
        }
        shown.extend(f.finish());
        (shown, false)
    }

    #[test]
    fn stop_strings_cut_the_answer_even_across_pieces() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        assert_eq!(run(&["END"], &["hello E", "N", "D more"]), ("hello ".into(), true));
        assert_eq!(run(&["END"], &["hello EN", "d"]), ("hello ENd".into(), false));
        assert_eq!(run(&["\n\n", "x"], &["one\n", "\ntwo"]), ("one".into(), true));
        assert_eq!(run(&["é!"], &["caf", "é", "!"]), ("caf".into(), true));
        assert_eq!(run(&["stop"], &["stop"]), ("".into(), true));
    }
}
