//! Fair claiming, defined once for both stores
//! ([`StateStore::claim_runs`](crate::StateStore::claim_runs)).
//!
//! Queued runs are grouped by [`Run::queue_key`] (the deployment; ad-hoc
//! runs by image). A claim of `limit` runs:
//!
//! 1. orders the groups that have claimable runs by when each was last
//!    served (never served first), then by its oldest claimable run
//!    ([`GROUPS_SQL`]); at most `limit` groups can get a run;
//! 2. takes runs by rank ([`take_fairly`]): the oldest claimable run of
//!    every group, in that order, then the second oldest of every group,
//!    and so on until `limit`. A burst of one group delays another group's
//!    first run by at most one claim, and runs of one group come out in
//!    submission order;
//! 3. marks the groups it served as served, in the order of each group's
//!    last run in the claim ([`served_order`]), so the group that got the
//!    last (perhaps one extra) run goes after the others next time.
//!
//! The stores differ only in how they read and write rows: PostgreSQL
//! locks what it reads with `FOR UPDATE SKIP LOCKED`, so replicas claim
//! disjoint runs without waiting on each other; SQLite has one writer at a
//! time.

use std::collections::VecDeque;

use crate::model::Run;
use crate::store::StoreError;

/// The groups a claim may serve, in serving order. Bound parameters: the
/// time (claims that expired before it count as unclaimed) and the limit.
/// Written with `$n` placeholders, which SQLite reads too.
pub(crate) const GROUPS_SQL: &str = "SELECT g.queue_key FROM (
         SELECT queue_key, MIN(id) AS first FROM runs
         WHERE state = 'queued' AND (claimed_by IS NULL OR claim_expires <= $1)
         GROUP BY queue_key
     ) g
     LEFT JOIN queues q ON q.queue_key = g.queue_key
     ORDER BY COALESCE(q.last_served, 0), g.first
     LIMIT $2";

/// Takes up to `limit` runs from `groups` groups (in serving order) by
/// rank, as the module docs say.
///
/// `fetch(group, after, n)` returns up to `n` of the group's claimable
/// runs with ids above `after`, oldest first. Fewer than `n` means the
/// group has no more it can give now (PostgreSQL: the rest may be locked
/// by another claimer). Every group still open is asked for the same
/// share of what is left, so each read stays small, and a group that runs
/// dry leaves its share to the others; some fetched runs may end up not
/// taken (the last round of shares can overshoot `limit`).
pub(crate) fn take_fairly<F>(
    groups: usize,
    limit: usize,
    mut fetch: F,
) -> Result<Vec<Run>, StoreError>
where
    F: FnMut(usize, i64, usize) -> Result<Vec<Run>, StoreError>,
{
    let mut lists: Vec<VecDeque<Run>> = vec![VecDeque::new(); groups];
    let mut after = vec![0_i64; groups];
    let mut more = vec![true; groups];
    let mut fetched = 0;
    while fetched < limit {
        let open: Vec<usize> = (0..groups).filter(|&i| more[i]).collect();
        if open.is_empty() {
            break;
        }
        let share = (limit - fetched).div_ceil(open.len());
        for i in open {
            let got = fetch(i, after[i], share)?;
            if got.len() < share {
                more[i] = false;
            }
            if let Some(last) = got.last() {
                after[i] = last.id.0;
            }
            fetched += got.len();
            lists[i].extend(got);
        }
    }
    // By rank: every group's first run before anyone's second. Every open
    // group was fetched to the same depth and every closed one is
    // exhausted, so these prefixes hold the first `limit` runs by rank.
    let mut runs = Vec::with_capacity(limit.min(fetched));
    while runs.len() < limit {
        let mut any = false;
        for list in &mut lists {
            if runs.len() == limit {
                break;
            }
            if let Some(run) = list.pop_front() {
                runs.push(run);
                any = true;
            }
        }
        if !any {
            break;
        }
    }
    Ok(runs)
}

/// The queue keys of `claimed`, each once, in the order they are marked
/// served: by the position of each group's last run in the claim.
pub(crate) fn served_order(claimed: &[Run]) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    for run in claimed.iter().rev() {
        let key = run.queue_key();
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    keys.reverse();
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{PinnedImage, RunId};

    /// A run of group `g` (its image) with id `id`.
    fn run(g: char, id: i64) -> Run {
        let image =
            PinnedImage::new("x", format!("sha256:{}", g.to_string().repeat(64))).expect("pin");
        let mut run = crate::transitions::resolve(
            &crate::model::RunSpec {
                image: Some(image),
                ..Default::default()
            },
            None,
            0,
        )
        .expect("resolve");
        run.id = RunId(id);
        run
    }

    /// Groups as lists of ids; `locked` ids are skipped by the fetch,
    /// like rows another claimer holds.
    fn claim(groups: &[(char, &[i64])], locked: &[i64], limit: usize) -> (Vec<i64>, usize) {
        let mut reads = 0;
        let runs = take_fairly(groups.len(), limit, |g, after, n| {
            reads += 1;
            let (c, ids) = groups[g];
            Ok(ids
                .iter()
                .filter(|&&i| i > after && !locked.contains(&i))
                .take(n)
                .map(|&i| run(c, i))
                .collect())
        })
        .expect("claim");
        (runs.iter().map(|r| r.id.0).collect(), reads)
    }

    #[test]
    fn runs_come_by_rank_in_group_order() {
        let a: &[i64] = &[1, 2, 3, 4, 5, 6];
        let b: &[i64] = &[7];
        let c: &[i64] = &[8, 9, 10];
        let (ids, _) = claim(&[('a', a), ('b', b), ('c', c)], &[], 7);
        assert_eq!(ids, [1, 7, 8, 2, 9, 3, 10]);
        let (ids, _) = claim(&[('b', b), ('a', a)], &[], 1);
        assert_eq!(ids, [7], "group order decides rank 1");
        let (ids, _) = claim(&[('a', a), ('b', b)], &[], 100);
        assert_eq!(ids, [1, 7, 2, 3, 4, 5, 6], "all there is");
        let (ids, _) = claim(&[], &[], 5);
        assert!(ids.is_empty());
        let (ids, _) = claim(&[('a', a)], &[], 0);
        assert!(ids.is_empty());
    }

    #[test]
    fn locked_runs_are_skipped_and_their_share_goes_to_others() {
        let a: &[i64] = &[1, 2, 3, 4, 5, 6, 7, 8];
        let b: &[i64] = &[9, 10, 11, 12];
        // B's first three are someone else's; A gives more instead.
        let (ids, reads) = claim(&[('a', a), ('b', b)], &[9, 10, 11], 6);
        assert_eq!(ids, [1, 12, 2, 3, 4, 5]);
        assert!(reads <= 4, "{reads} reads");
    }

    #[test]
    fn groups_are_marked_in_the_order_of_their_last_run() {
        let claimed = [
            run('a', 1),
            run('b', 2),
            run('a', 3),
            run('c', 4),
            run('b', 5),
        ];
        let keys: Vec<String> = served_order(&claimed);
        let key = |c| run(c, 0).queue_key();
        assert_eq!(keys, [key('a'), key('c'), key('b')]);
        assert!(served_order(&[]).is_empty());
    }
}
