//! Seeded corruptions of tokenized text, the text analogues of `metaloop_proto::domains`'
//! transforms: pure functions of the data and a u64 seed (derive it with
//! `metaloop_proto::rng::derive_seed`), so coordinator and workers corrupt identically. Each
//! says which rows it changed (the domain record's `flipped`). Fractions are exact: `fraction`
//! of the rows (or tokens), rounded, chosen uniformly without replacement.

use super::TokenizedText;
use metaloop_proto::rng::SplitMix64;

/// `round(fraction · n)` of `0..n`, uniformly without replacement, sorted.
fn choose(n: usize, fraction: f64, rng: &mut SplitMix64) -> Vec<usize> {
    let k = ((fraction.clamp(0.0, 1.0) * n as f64).round() as usize).min(n);
    let mut all: Vec<usize> = (0..n).collect();
    // Partial Fisher–Yates: the first k places end up a uniform k-subset.
    for i in 0..k {
        let j = i + rng.below(n - i);
        all.swap(i, j);
    }
    all.truncate(k);
    all.sort_unstable();
    all
}

/// Gives `fraction` of the rows a different class, drawn uniformly from the others. Returns
/// the rows changed (sorted); none with fewer than two classes.
pub fn label_noise(data: &mut TokenizedText, fraction: f64, seed: u64) -> Vec<usize> {
    let classes = data.classes();
    if classes < 2 {
        return Vec::new();
    }
    let mut rng = SplitMix64::new(seed);
    let rows = choose(data.len(), fraction, &mut rng);
    for &r in &rows {
        let y = data.labels[r];
        let other = rng.below(classes - 1) as i64;
        data.labels[r] = if other >= y { other + 1 } else { other };
    }
    rows
}

/// Relabels every row through one permutation of the classes with no fixed point (every label
/// changes). Returns `permutation` (`permutation[c]` is the label given to class c) and the
/// rows changed: all of them, with two classes or more.
pub fn permute_labels(data: &mut TokenizedText, seed: u64) -> (Vec<i64>, Vec<usize>) {
    let n = data.classes();
    let mut p: Vec<i64> = (0..n as i64).collect();
    if n < 2 {
        return (p, Vec::new());
    }
    let mut rng = SplitMix64::new(seed);
    loop {
        rng.shuffle(&mut p);
        if p.iter().enumerate().all(|(i, &v)| v != i as i64) {
            break;
        }
    }
    for y in &mut data.labels {
        *y = p[*y as usize];
    }
    (p, (0..data.len()).collect())
}

/// What [`token_noise`] changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenNoise {
    /// Rows with at least one token replaced (sorted).
    pub rows: Vec<usize>,
    /// Tokens replaced in all.
    pub tokens: usize,
}

/// Replaces `fraction` of the non-special tokens (over the whole set) by a different id drawn
/// uniformly from the non-special vocabulary; special tokens ([CLS], [SEP], …) are never
/// touched nor produced, and rows keep their lengths.
pub fn token_noise(data: &mut TokenizedText, fraction: f64, seed: u64) -> TokenNoise {
    let special = &data.special_ids;
    let ordinary: Vec<u32> = (0..data.vocab_size)
        .filter(|id| special.binary_search(id).is_err())
        .collect();
    if ordinary.len() < 2 {
        return TokenNoise {
            rows: Vec::new(),
            tokens: 0,
        };
    }
    let places: Vec<usize> = (0..data.ids.len())
        .filter(|&j| special.binary_search(&data.ids[j]).is_err())
        .collect();
    let mut rng = SplitMix64::new(seed);
    let chosen = choose(places.len(), fraction, &mut rng);
    let mut rows = Vec::new();
    for &c in &chosen {
        let j = places[c];
        let old = data.ids[j];
        // `old` is ordinary, so it is in the list; draw among the others.
        let at = ordinary.partition_point(|&v| v < old);
        let r = rng.below(ordinary.len() - 1);
        data.ids[j] = ordinary[if r >= at { r + 1 } else { r }];
        let row = data.offsets.partition_point(|&o| o as usize <= j) - 1;
        if rows.last() != Some(&row) {
            rows.push(row);
        }
    }
    TokenNoise {
        rows,
        tokens: chosen.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::tokenized::tests::sample;
    use crate::text::Categorical;

    /// 1000 rows of 2..=9 tokens, [CLS]=1 … [SEP]=2, labels over 4 classes.
    fn big() -> TokenizedText {
        let mut t = sample();
        let mut rng = SplitMix64::new(5);
        t.ids.clear();
        t.offsets = vec![0];
        t.labels.clear();
        for i in 0..1000 {
            t.ids.push(1);
            for _ in 0..rng.below(8) {
                t.ids.push(3 + rng.below(47) as u32);
            }
            t.ids.push(2);
            t.offsets.push(t.ids.len() as u32);
            t.labels.push(i % 4);
        }
        t.label_names = ["a", "b", "c", "d"].map(String::from).to_vec();
        t.domains = Some(Categorical {
            names: vec!["x".into()],
            ids: vec![0; 1000],
        });
        t.truncated.clear();
        t
    }

    #[test]
    fn label_noise_changes_exactly_the_fraction_deterministically() {
        let clean = big();
        let mut a = clean.clone();
        let rows = label_noise(&mut a, 0.3, 11);
        assert_eq!(rows.len(), 300);
        let changed: Vec<usize> = (0..1000).filter(|&i| a.labels[i] != clean.labels[i]).collect();
        assert_eq!(changed, rows);
        assert!(a.labels.iter().all(|&l| (0..4).contains(&l)));
        let mut b = clean.clone();
        assert_eq!(label_noise(&mut b, 0.3, 11), rows);
        assert_eq!(a, b);
        let mut c = clean.clone();
        assert_ne!(label_noise(&mut c, 0.3, 12), rows);
        let mut d = clean.clone();
        assert!(label_noise(&mut d, 0.0, 11).is_empty() && d == clean);
        assert_eq!(label_noise(&mut d, 1.0, 11).len(), 1000);
    }

    #[test]
    fn permutation_is_a_derangement_applied_to_every_row() {
        let clean = big();
        let mut a = clean.clone();
        let (p, rows) = permute_labels(&mut a, 3);
        assert_eq!(rows.len(), 1000);
        let mut sorted = p.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, [0, 1, 2, 3]);
        assert!(p.iter().enumerate().all(|(c, &v)| v != c as i64));
        assert!((0..1000).all(|i| a.labels[i] == p[clean.labels[i] as usize]));
        let mut b = clean.clone();
        assert_eq!(permute_labels(&mut b, 3).0, p);
    }

    #[test]
    fn token_noise_replaces_the_fraction_of_ordinary_tokens_only() {
        let clean = big();
        let ordinary = clean.ids.iter().filter(|&&id| id > 2).count();
        let mut a = clean.clone();
        let noise = token_noise(&mut a, 0.25, 9);
        assert_eq!(noise.tokens, (ordinary as f64 * 0.25).round() as usize);
        let changed: Vec<usize> = (0..clean.ids.len()).filter(|&j| a.ids[j] != clean.ids[j]).collect();
        assert_eq!(changed.len(), noise.tokens, "every chosen token really changes");
        assert!(changed
            .iter()
            .all(|&j| clean.ids[j] > 2 && a.ids[j] > 2 && a.ids[j] < 50));
        assert_eq!(a.offsets, clean.offsets);
        let rows: Vec<usize> = (0..a.len()).filter(|&r| a.row(r) != clean.row(r)).collect();
        assert_eq!(rows, noise.rows);
        let mut b = clean.clone();
        assert_eq!(token_noise(&mut b, 0.25, 9), noise);
        assert_eq!(a, b);
        assert_ne!(a.checksum(), clean.checksum());
        let mut c = clean.clone();
        assert_ne!(token_noise(&mut c, 0.25, 10).rows, noise.rows);
    }
}
