//! The pair batch: several preference pairs packed into one token row with no padding.
//!
//! Shared layout (the default): each pair is laid out once as `[prompt | chosen | rejected]`,
//! so the prompt is computed once for both answers. Concatenated layout: each pair becomes
//! two sequences `[prompt | chosen]` and `[prompt | rejected]`, as most trainers do; it must
//! give the same log-probs and exists for comparison.
//!
//! Every token belongs to an attention group (the pair in the shared layout, the sequence
//! in the concatenated one) and a branch (0 prompt, 1 chosen, 2 rejected). The one
//! attention rule both layouts use: query q sees key k iff
//! `group(k) == group(q) && k <= q && (branch(k) == 0 || branch(k) == branch(q))`.
//! Rejected tokens continue the prompt's positions, exactly as chosen tokens do.

use crate::error::{Error, Result};

/// One tokenized preference pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairExample {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    /// Where the pair came from (a file name or the record's `source` field); used by
    /// the `sources` partition.
    pub source: String,
}

impl PairExample {
    /// Tokens this pair occupies in the shared layout.
    pub fn shared_len(&self) -> usize {
        self.prompt.len() + self.chosen.len() + self.rejected.len()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Layout {
    #[default]
    Shared,
    Concatenated,
}

pub const PROMPT: u8 = 0;
pub const CHOSEN: u8 = 1;
pub const REJECTED: u8 = 2;

/// A row of the batch whose logits predict a completion token. The last prompt row
/// of a pair in the shared layout appears twice: it predicts the first chosen and the
/// first rejected token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogpTarget {
    pub row: u32,
    pub token: u32,
    pub pair: u32,
    /// CHOSEN or REJECTED.
    pub branch: u8,
}

/// The rows that go through the LM head: each distinct target row once (ascending), and
/// for each target, the slot of its row. A row carries one or two targets.
#[derive(Clone, Debug, PartialEq)]
pub struct LogpPlan {
    pub rows: Vec<u32>,
    /// Per target: index into `rows`.
    pub slot: Vec<u32>,
    /// Per target: the token it predicts.
    pub tokens: Vec<u32>,
    /// Per row: its targets (`u32::MAX` where a row has only one).
    pub row_targets: Vec<[u32; 2]>,
}

impl LogpPlan {
    pub fn new(targets: &[LogpTarget]) -> Self {
        let mut rows: Vec<u32> = targets.iter().map(|t| t.row).collect();
        rows.sort_unstable();
        rows.dedup();
        let slot: Vec<u32> = targets.iter().map(|t| rows.binary_search(&t.row).unwrap() as u32).collect();
        let mut row_targets = vec![[u32::MAX; 2]; rows.len()];
        for (i, &s) in slot.iter().enumerate() {
            let rt = &mut row_targets[s as usize];
            let free = rt.iter_mut().find(|x| **x == u32::MAX).expect("a row predicts at most two targets");
            *free = i as u32;
        }
        LogpPlan { rows, slot, tokens: targets.iter().map(|t| t.token).collect(), row_targets }
    }

    /// Each target's place in a per-row array `[rows, 2]` (the layout the LM-head kernels
    /// read and write): `(2·row slot + which of the row's targets, target index)`.
    pub fn row_places(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.row_targets.iter().enumerate().flat_map(|(r, rt)| {
            rt.iter().enumerate().filter(|(_, &t)| t != u32::MAX).map(move |(j, &t)| (2 * r + j, t as usize))
        })
    }

    /// A per-target array laid out per row, `[rows, 2]`, with `none` where a row has one target.
    pub fn to_rows<T: Copy>(&self, per_target: &[T], none: T) -> Vec<T> {
        let mut out = vec![none; 2 * self.rows.len()];
        for (place, t) in self.row_places() {
            out[place] = per_target[t];
        }
        out
    }

    /// Per row, `[rows, 2]`: the tokens its targets predict, −1 for none (the LM-head
    /// kernels' targets).
    pub fn row_tokens(&self) -> Vec<i32> {
        self.to_rows(&self.tokens.iter().map(|&t| t as i32).collect::<Vec<_>>(), -1)
    }

    /// The per-target array (in `targets` order) of a per-row one, `[rows, 2]`.
    pub fn to_targets<T: Copy + Default>(&self, per_row: &[T]) -> Vec<T> {
        let mut out = vec![T::default(); self.slot.len()];
        for (place, t) in self.row_places() {
            out[t] = per_row[place];
        }
        out
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct PairBatch {
    pub layout: Layout,
    pub n_pairs: usize,
    /// Per token (length `n_tokens`).
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    pub group: Vec<u32>,
    pub branch: Vec<u8>,
    /// `group_start[g]..group_start[g+1]` are the rows of attention group g.
    pub group_start: Vec<u32>,
    /// Rows that predict completion tokens, grouped by pair, chosen before rejected.
    pub targets: Vec<LogpTarget>,
}

impl PairBatch {
    pub fn new(pairs: &[&PairExample], layout: Layout) -> Result<Self> {
        let mut b = PairBatch {
            layout,
            n_pairs: pairs.len(),
            tokens: Vec::new(),
            positions: Vec::new(),
            group: Vec::new(),
            branch: Vec::new(),
            group_start: vec![0],
            targets: Vec::new(),
        };
        for (p, ex) in pairs.iter().enumerate() {
            if ex.prompt.is_empty() || ex.chosen.is_empty() || ex.rejected.is_empty() {
                return Err(Error::invalid(format!(
                    "pair {p} has an empty prompt, chosen or rejected: each needs at least one token"
                )));
            }
            match layout {
                Layout::Shared => {
                    let g = b.group_start.len() as u32 - 1;
                    let last_prompt = b.push(&ex.prompt, 0, g, PROMPT);
                    let start = ex.prompt.len() as u32;
                    b.push_completion(&ex.chosen, start, g, CHOSEN, last_prompt, p);
                    b.push_completion(&ex.rejected, start, g, REJECTED, last_prompt, p);
                    b.group_start.push(b.tokens.len() as u32);
                }
                Layout::Concatenated => {
                    for (answer, branch) in [(&ex.chosen, CHOSEN), (&ex.rejected, REJECTED)] {
                        let g = b.group_start.len() as u32 - 1;
                        let last_prompt = b.push(&ex.prompt, 0, g, PROMPT);
                        b.push_completion(answer, ex.prompt.len() as u32, g, branch, last_prompt, p);
                        b.group_start.push(b.tokens.len() as u32);
                    }
                }
            }
        }
        Ok(b)
    }

    pub fn n_tokens(&self) -> usize {
        self.tokens.len()
    }

    pub fn n_groups(&self) -> usize {
        self.group_start.len() - 1
    }

    /// Whether query row `q` attends to key row `k` (the rule in the module comment).
    #[inline]
    pub fn attends(&self, q: usize, k: usize) -> bool {
        k <= q && self.group[k] == self.group[q] && (self.branch[k] == PROMPT || self.branch[k] == self.branch[q])
    }

    /// Appends tokens with consecutive positions from `pos0`; returns the last row.
    fn push(&mut self, ids: &[u32], pos0: u32, group: u32, branch: u8) -> u32 {
        for (i, &t) in ids.iter().enumerate() {
            self.tokens.push(t);
            self.positions.push(pos0 + i as u32);
            self.group.push(group);
            self.branch.push(branch);
        }
        self.tokens.len() as u32 - 1
    }

    /// Appends a completion; token j is predicted by the row before it (the last
    /// prompt row for j = 0).
    fn push_completion(&mut self, ids: &[u32], pos0: u32, group: u32, branch: u8, last_prompt: u32, pair: usize) {
        let first = self.tokens.len() as u32;
        for (j, &token) in ids.iter().enumerate() {
            let row = if j == 0 { last_prompt } else { first + j as u32 - 1 };
            self.targets.push(LogpTarget { row, token, pair: pair as u32, branch });
        }
        self.push(ids, pos0, group, branch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(p: &[u32], c: &[u32], r: &[u32]) -> PairExample {
        PairExample { prompt: p.to_vec(), chosen: c.to_vec(), rejected: r.to_vec(), source: String::new() }
    }

    #[test]
    fn shared_layout_positions_mask_and_targets() {
        let a = pair(&[1, 2], &[3, 4, 5], &[6]);
        let b = pair(&[7], &[8], &[9, 10]);
        let batch = PairBatch::new(&[&a, &b], Layout::Shared).unwrap();
        assert_eq!(batch.tokens, vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        assert_eq!(batch.positions, vec![0, 1, 2, 3, 4, 2, 0, 1, 1, 2]);
        assert_eq!(batch.group_start, vec![0, 6, 10]);
        // rejected (row 5) sees the prompt and itself, never the chosen rows
        let seen: Vec<usize> = (0..10).filter(|&k| batch.attends(5, k)).collect();
        assert_eq!(seen, vec![0, 1, 5]);
        // the second pair never sees the first
        assert!(!batch.attends(6, 5));
        let rows: Vec<(u32, u32, u8)> = batch.targets.iter().map(|t| (t.row, t.token, t.branch)).collect();
        assert_eq!(rows, vec![(1, 3, 1), (2, 4, 1), (3, 5, 1), (1, 6, 2), (6, 8, 1), (6, 9, 2), (8, 10, 2)]);

        // The head's plan: rows 1 and 6 carry two targets each, the others one.
        let plan = LogpPlan::new(&batch.targets);
        assert_eq!(plan.rows, vec![1, 2, 3, 6, 8]);
        let row_tokens = plan.row_tokens();
        assert_eq!(row_tokens, vec![3, 6, 4, -1, 5, -1, 8, 9, 10, -1]);
        let tokens: Vec<i32> = batch.targets.iter().map(|t| t.token as i32).collect();
        assert_eq!(plan.to_targets(&row_tokens), tokens);
    }

    #[test]
    fn concatenated_layout_is_two_causal_sequences() {
        let a = pair(&[1, 2], &[3], &[4, 5]);
        let batch = PairBatch::new(&[&a], Layout::Concatenated).unwrap();
        assert_eq!(batch.tokens, vec![1, 2, 3, 1, 2, 4, 5]);
        assert_eq!(batch.positions, vec![0, 1, 2, 0, 1, 2, 3]);
        assert_eq!(batch.n_groups(), 2);
        assert!(!batch.attends(3, 2));
        assert!(batch.attends(6, 3));
        let rows: Vec<(u32, u32)> = batch.targets.iter().map(|t| (t.row, t.token)).collect();
        assert_eq!(rows, vec![(1, 3), (4, 4), (5, 5)]);
    }

    #[test]
    fn empty_parts_are_rejected() {
        let a = pair(&[1], &[], &[2]);
        assert!(PairBatch::new(&[&a], Layout::Shared).is_err());
    }
}
