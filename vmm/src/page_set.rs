//! A set of guest pages whose size, and the cost of every operation on it, grow with the pages
//! in it, not with guest RAM (issue 12: "harvest cost proportional to the pages dirtied").
//!
//! A harvest used to be a bitmap of the whole guest from each source (128 KiB at 4 GiB), and
//! every step after it — the union of the sources, handing it to each consumer of changes,
//! listing its pages — passed over all of it, although an epoch dirties a few hundred pages.
//! [`PageSet`] keeps only the 64-page words that hold a page, in ascending order: the dirty
//! ring and the device bitmap produce it from what was written (`crate::dirty_ring`,
//! `crate::device_bitmap`), unions are merges of two short sorted lists, and the page list is
//! read from it directly. KVM's bitmap source still reads a whole-guest bitmap (that is what
//! `KVM_GET_DIRTY_LOG` returns) and makes a set of it with one pass.

/// One 64-page word of a [`PageSet`]: pages `index * 64 ..` whose bits are set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Word {
    index: u64,
    bits: u64,
}

/// A set of page numbers: the words that hold one, ascending, none empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageSet {
    words: Vec<Word>,
}

impl PageSet {
    /// The empty set.
    pub fn new() -> PageSet {
        PageSet::default()
    }

    /// The pages whose bits are set in `bitmap` (bit `p % 64` of word `p / 64` is page `p`).
    pub fn from_bitmap(bitmap: &[u64]) -> PageSet {
        let mut s = PageSet::new();
        for (i, &bits) in bitmap.iter().enumerate() {
            if bits != 0 {
                s.words.push(Word {
                    index: i as u64,
                    bits,
                });
            }
        }
        s
    }

    /// The set of `pages`, in any order, repeats allowed.
    pub fn from_pages(pages: &[u64]) -> PageSet {
        let mut sorted = pages.to_vec();
        sorted.sort_unstable();
        let mut s = PageSet::new();
        for p in sorted {
            s.push_page(p);
        }
        s
    }

    /// Adds page `p`.
    pub fn push_page(&mut self, p: u64) {
        self.push_word(p / 64, 1 << (p % 64));
    }

    /// Adds the pages `bits` of word `index`. Cheapest in ascending order (how the sources
    /// produce them: an append); a word below the last is inserted in its place.
    pub fn push_word(&mut self, index: u64, bits: u64) {
        if bits == 0 {
            return;
        }
        match self.words.last_mut() {
            Some(w) if w.index == index => w.bits |= bits,
            Some(w) if w.index > index => {
                match self.words.binary_search_by_key(&index, |w| w.index) {
                    Ok(i) => self.words[i].bits |= bits,
                    Err(i) => self.words.insert(i, Word { index, bits }),
                }
            }
            _ => self.words.push(Word { index, bits }),
        }
    }

    /// The empty set, with room for `words` words without reallocating.
    pub fn with_capacity(words: usize) -> PageSet {
        PageSet {
            words: Vec::with_capacity(words),
        }
    }

    /// `self ∪= other`: a merge of the two word lists.
    pub fn union_with(&mut self, other: &PageSet) {
        if other.words.is_empty() {
            return;
        }
        let after = self
            .words
            .last()
            .is_none_or(|l| l.index < other.words[0].index);
        if after {
            // (The common case when a consumer's pending set is empty or older pages only.)
            self.words.extend_from_slice(&other.words);
            return;
        }
        self.words = merge(&self.words, &other.words);
    }

    /// `self ∪ other`.
    pub fn union(&self, other: &PageSet) -> PageSet {
        match (self.words.is_empty(), other.words.is_empty()) {
            (_, true) => self.clone(),
            (true, false) => other.clone(),
            (false, false) => PageSet {
                words: merge(&self.words, &other.words),
            },
        }
    }

    /// True if page `p` is in the set.
    pub fn contains(&self, p: u64) -> bool {
        self.words
            .binary_search_by_key(&(p / 64), |w| w.index)
            .is_ok_and(|i| self.words[i].bits & (1 << (p % 64)) != 0)
    }

    /// The page numbers below `limit`, ascending.
    pub fn pages(&self, limit: u64) -> Vec<u64> {
        let mut out = Vec::with_capacity(self.len());
        for w in &self.words {
            let mut bits = w.bits;
            while bits != 0 {
                let p = w.index * 64 + u64::from(bits.trailing_zeros());
                if p >= limit {
                    return out;
                }
                out.push(p);
                bits &= bits - 1;
            }
        }
        out
    }

    /// Number of pages in the set.
    pub fn len(&self) -> usize {
        self.words
            .iter()
            .map(|w| w.bits.count_ones() as usize)
            .sum()
    }

    /// True if no page is in the set.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// The set's words, ascending: `(index, bits)`, pages `index * 64 + b` for each bit `b`
    /// set in `bits` (never 0).
    pub fn words(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.words.iter().map(|w| (w.index, w.bits))
    }

    /// The set as a bitmap of `len` words (pages beyond them left out).
    pub fn to_bitmap(&self, len: usize) -> Vec<u64> {
        let mut out = vec![0; len];
        for w in &self.words {
            if let Some(o) = out.get_mut(w.index as usize) {
                *o = w.bits;
            }
        }
        out
    }

    /// Empties the set, keeping its memory.
    pub fn clear(&mut self) {
        self.words.clear();
    }
}

/// The words of `a` and `b` (each ascending), ascending, a word in both OR-ed.
fn merge(a: &[Word], b: &[Word]) -> Vec<Word> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        let (x, y) = (a[i], b[j]);
        match x.index.cmp(&y.index) {
            std::cmp::Ordering::Less => {
                out.push(x);
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                out.push(y);
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                out.push(Word {
                    index: x.index,
                    bits: x.bits | y.bits,
                });
                i += 1;
                j += 1;
            }
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn built_from_a_bitmap_or_pages_it_lists_them_in_order() {
        let s = PageSet::from_bitmap(&[0b101, 0, 1 << 63]);
        assert_eq!(s.pages(u64::MAX), vec![0, 2, 191]);
        assert_eq!(s.pages(191), vec![0, 2], "clipped below the limit");
        assert_eq!(s.len(), 3);
        assert_eq!(PageSet::from_pages(&[191, 2, 0, 2]), s);
        assert_eq!(s.to_bitmap(2), vec![0b101, 0], "cut to its length");
        assert_eq!(
            s.words().collect::<Vec<_>>(),
            vec![(0, 0b101), (2, 1 << 63)]
        );
        assert!(s.contains(2) && s.contains(191) && !s.contains(1) && !s.contains(64));
        assert!(PageSet::from_bitmap(&[0, 0]).is_empty());
        let mut s2 = s.clone();
        s2.push_page(191);
        s2.push_page(4096);
        s2.push_word(70, 0);
        s2.push_page(5);
        s2.push_page(70);
        s2.push_page(71);
        assert_eq!(s2.pages(u64::MAX), vec![0, 2, 5, 70, 71, 191, 4096]);
        s2.clear();
        assert!(s2.is_empty());
        assert_eq!(s2.len(), 0);
    }

    /// Seeded: unions of random sets equal the unions of their page sets.
    #[test]
    fn unions_match_a_model_set() {
        for seed in 1..=200u64 {
            let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let mut next = move |n: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n
            };
            let mut acc = PageSet::new();
            let mut model = BTreeSet::new();
            for _ in 0..20 {
                let span = [64, 1024, 1 << 20][next(3) as usize];
                let pages: Vec<u64> = (0..next(50)).map(|_| next(span)).collect();
                let s = match next(2) {
                    0 => PageSet::from_pages(&pages),
                    _ => {
                        let mut s = PageSet::new();
                        pages.iter().for_each(|&p| s.push_page(p));
                        s
                    }
                };
                model.extend(pages.iter().copied());
                let u = acc.union(&s);
                acc.union_with(&s);
                assert_eq!(u, acc, "seed {seed}");
                let want: Vec<u64> = model.iter().copied().collect();
                assert_eq!(acc.pages(u64::MAX), want, "seed {seed}");
                assert_eq!(acc.len(), want.len(), "seed {seed}");
                for p in pages {
                    assert!(acc.contains(p), "seed {seed}: {p}");
                }
            }
        }
    }
}
