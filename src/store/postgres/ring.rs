//! Where a channel lives: its id hashes to one of [`BUCKETS`] buckets, and a bucket → shard
//! map, made once by consistent hashing when the cluster is created and stored in shard 0,
//! names the shard. Adding a shard later would move only the buckets its ring points take
//! (~1/N of them); moving buckets online is not built yet.

/// Buckets of the channel space. Fixed for the life of a cluster.
pub const BUCKETS: usize = 4096;

/// Ring points per shard: enough that each shard's share stays near 1/N.
const POINTS_PER_SHARD: u32 = 128;

/// A 64-bit mix (SplitMix64's finaliser): stable across builds and platforms, which the
/// stored map depends on.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a of a string, mixed.
fn hash_str(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

/// The bucket of a channel id.
pub fn bucket_of_channel(id: i64) -> usize {
    (mix(id as u64) % BUCKETS as u64) as usize
}

/// The bucket of a DM's pair key: the DM channel is made on this bucket's shard, so the
/// one shard that can hold a pair's DM is known before it exists.
pub fn bucket_of_key(key: &str) -> usize {
    (hash_str(key) % BUCKETS as u64) as usize
}

/// The bucket → shard map for `shards` shards by consistent hashing.
pub fn build_map(shards: usize) -> Vec<i32> {
    assert!(shards >= 1);
    let mut ring: Vec<(u64, i32)> = (0..shards)
        .flat_map(|s| {
            (0..POINTS_PER_SHARD).map(move |p| (hash_str(&format!("shard-{s}-{p}")), s as i32))
        })
        .collect();
    ring.sort_unstable();
    (0..BUCKETS)
        .map(|b| {
            let point = hash_str(&format!("bucket-{b}"));
            let i = ring.partition_point(|(h, _)| *h < point);
            ring[i % ring.len()].1
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_even_and_a_new_shard_moves_about_its_share() {
        for n in 1..=4 {
            let map = build_map(n);
            for s in 0..n as i32 {
                let share = map.iter().filter(|&&x| x == s).count() as f64 / BUCKETS as f64;
                let fair = 1.0 / n as f64;
                assert!(
                    (share - fair).abs() < fair * 0.35,
                    "{n} shards: shard {s} has {share}"
                );
            }
        }
        let (three, four) = (build_map(3), build_map(4));
        let moved = three.iter().zip(&four).filter(|(a, b)| a != b).count();
        // Only buckets that move to the new shard move.
        assert!(three.iter().zip(&four).all(|(a, b)| a == b || *b == 3));
        assert!(moved < BUCKETS * 35 / 100, "{moved} moved");
    }

    #[test]
    fn the_map_is_stable() {
        // The stored map of an existing cluster is checked against nothing built at run
        // time, but new clusters must get the same map from every build.
        let map = build_map(2);
        assert_eq!(map.len(), BUCKETS);
        assert_eq!(bucket_of_channel(0), bucket_of_channel(0));
        assert_ne!(bucket_of_key("1:2"), bucket_of_key("1:3"));
    }
}
