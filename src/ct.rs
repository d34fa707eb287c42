//! Comparison of secrets in constant time (one place for the gateway's few uses: the
//! per-connection token memo, login cookies' MACs, state and nonce, certificate thumbprints).

/// Whether `a` and `b` are equal, looking at every byte whatever the first difference, so the
/// time taken says nothing about where they differ (lengths are not secret).
///
/// The fold has no early exit; the compiler turns it into vector instructions, so the ~1 KB
/// token the memo compares on every request costs ~100 instructions (aws-lc's
/// `CRYPTO_memcmp`, a byte at a time behind a barrier, was ~8 a byte).
pub fn eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::eq;

    #[test]
    fn equal_only_when_every_byte_is() {
        let a: Vec<u8> = (0..1031u32).map(|i| (i * 7 + 3) as u8).collect();
        assert!(eq(&a, &a.clone()));
        assert!(eq(b"", b""));
        for i in 0..a.len() {
            for bit in [0x01, 0x80] {
                let mut b = a.clone();
                b[i] ^= bit;
                assert!(!eq(&a, &b), "a difference at byte {i} must be seen");
            }
        }
        assert!(!eq(&a, &a[..a.len() - 1]));
        assert!(!eq(b"abc", b"abcd"));
    }
}
