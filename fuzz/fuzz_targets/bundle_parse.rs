//! The `.suture` parser on arbitrary bytes: it must never panic or hang, and whatever it
//! accepts must re-encode to exactly the bytes it was given (one patch, one byte string).
#![no_main]

use libfuzzer_sys::fuzz_target;
use suture_bundle::{Bundle, TrustStore};

fuzz_target!(|data: &[u8]| {
    let Ok(b) = Bundle::parse(data) else {
        return;
    };
    assert_eq!(
        b.to_bytes(),
        data,
        "an accepted bundle must re-encode to its own bytes"
    );
    let _ = b.content_address();
    // Untrusted signer: refused before any signature work.
    assert!(b.verify(&TrustStore::new()).is_err());
    // Trusted signer: the signature check itself runs on fuzzed bytes.
    let mut trust = TrustStore::new();
    trust.add(b.signer.clone());
    let _ = b.verify(&trust);
});
