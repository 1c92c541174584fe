//! Property-based fuzzing of what a peer sends to be authenticated: the certificate whose
//! `lockstep://` identity is read (after the CA verified it, but read all the same), the
//! identity URIs, and the token file. On any input each returns a value or an error, never
//! panics, and never accepts an identity that could name a path outside its place.
//!
//! `make test` runs 2,000 cases per property; `make fuzz` sets `LOCKSTEP_FUZZ_CASES`.

use lockstep_proto::auth::{Identity, Tokens, certificate_identity};
use proptest::collection::vec;
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig::with_cases(lockstep_tests::fuzz_cases())
}

/// A real certificate naming `lockstep://agent/shard-0`, as DER.
fn certificate() -> Vec<u8> {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    params.subject_alt_names.push(rcgen::SanType::URI(
        "lockstep://agent/shard-0".try_into().expect("uri"),
    ));
    params.self_signed(&key).expect("sign").der().to_vec()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_bytes_as_a_certificate_never_panic(bytes in vec(any::<u8>(), 0..2048)) {
        let _ = certificate_identity(&bytes);
    }

    #[test]
    fn a_damaged_certificate_never_panics_and_never_names_another_agent(
        at in any::<prop::sample::Index>(),
        to in any::<u8>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut der = certificate();
        let i = at.index(der.len());
        der[i] = to;
        der.truncate(cut.index(der.len() + 1));
        if let Ok(identity) = certificate_identity(&der) {
            // Flipping a byte of the URI can make it another valid name; never a path.
            let uri = identity.to_string();
            prop_assert!(!uri.contains("..") && !uri.contains('\0'), "{uri}");
        }
    }

    #[test]
    fn identities_accepted_are_plain_names(uri in "lockstep://[a-z]{0,12}(/[ -~]{0,20}){0,2}") {
        if let Ok(identity) = Identity::parse(&uri) {
            prop_assert_eq!(identity.to_string(), uri.clone());
            let name = uri.rsplit('/').next().unwrap_or_default();
            prop_assert!(!name.contains("..") && !name.starts_with('.'), "{uri}");
        }
    }

    #[test]
    fn any_token_file_never_panics(text in "[ -~\n\t]{0,400}") {
        if let Ok(tokens) = Tokens::parse(&text) {
            prop_assert!(tokens.identity("").is_none() || !tokens.is_empty());
        }
    }
}

#[test]
fn the_real_certificate_names_its_agent() {
    assert_eq!(
        certificate_identity(&certificate()),
        Ok(Identity::parse("lockstep://agent/shard-0").expect("identity"))
    );
}
