//! The bundle format: round trip, and every way a bundle can be wrong is refused precisely.

use std::os::unix::fs::PermissionsExt;

use suture_bundle::*;

/// Smallest byte string that passes as an x86-64 ET_REL object header.
fn object() -> Vec<u8> {
    let mut o = vec![0u8; 128];
    o[..4].copy_from_slice(b"\x7fELF");
    o[4] = 2; // ELFCLASS64
    o[5] = 1; // little-endian
    o[16] = 1; // ET_REL
    o[18] = 62; // EM_X86_64
    o
}

fn manifest() -> Manifest {
    Manifest {
        format: FORMAT_VERSION,
        id: "svc-L1-fix".into(),
        level: 1,
        module: ModuleRef {
            build_id: "4bfdbb6ee68454cb5f563abf8bf0ff3f1062812c".into(),
            name: "svc".into(),
        },
        cves: vec!["CVE-2024-12345".into()],
        description: "fix parse_header".into(),
        functions: vec![FunctionPatch {
            symbol: "parse_header".into(),
            address: 0x1530,
            size: 64,
            expected_sha256: "61".repeat(32),
            replacement: "parse_header".into(),
        }],
        bindings: vec![
            Binding {
                symbol: "counter".into(),
                target: BindTarget::Module { address: 0x4088 },
            },
            Binding {
                symbol: "strlen".into(),
                target: BindTarget::External {
                    name: "strlen".into(),
                },
            },
        ],
        accepted: Vec::new(),
    }
}

struct Keys {
    _dir: tempfile::TempDir,
    secret: SecretKey,
    trust: TrustStore,
}

fn keys() -> Keys {
    let dir = tempfile::tempdir().unwrap();
    let (k, p) = generate_keypair("ops", dir.path()).unwrap();
    let secret = SecretKey::load(&k).unwrap();
    let trust = TrustStore::load_files(&[p]).unwrap();
    Keys {
        _dir: dir,
        secret,
        trust,
    }
}

fn signed(k: &Keys) -> Bundle {
    Bundle::sign(manifest(), object(), &k.secret).unwrap()
}

#[test]
fn round_trip_and_verify() {
    let k = keys();
    let b = signed(&k);
    let bytes = b.to_bytes();
    let back = Bundle::parse(&bytes).unwrap();
    assert_eq!(back.manifest, b.manifest);
    assert_eq!(back.object, b.object);
    back.verify(&k.trust).unwrap();
    assert_eq!(back.content_address(), sha256_hex(&bytes));
    assert_eq!(back.to_bytes(), bytes, "one patch, one byte string");
}

#[test]
fn any_flipped_byte_is_refused() {
    let k = keys();
    let bytes = signed(&k).to_bytes();
    for i in 0..bytes.len() {
        let mut t = bytes.clone();
        t[i] ^= 0x01;
        let ok = Bundle::parse(&t).and_then(|b| b.verify(&k.trust)).is_ok();
        assert!(!ok, "flipping byte {i} went unnoticed");
    }
}

#[test]
fn tampered_object_fails_the_signature() {
    let k = keys();
    let mut bytes = signed(&k).to_bytes();
    let n = bytes.len();
    bytes[n - 96 - 10] ^= 0x80; // inside the object
    let b = Bundle::parse(&bytes).unwrap();
    assert!(matches!(b.verify(&k.trust), Err(BundleError::BadSignature)));
}

#[test]
fn untrusted_key_is_named() {
    let k = keys();
    let other = keys();
    let b = signed(&k);
    match b.verify(&other.trust) {
        Err(BundleError::Untrusted { fingerprint, .. }) => {
            assert_eq!(fingerprint, k.secret.public().fingerprint())
        }
        other => panic!("expected Untrusted, got {other:?}"),
    }
}

#[test]
fn non_canonical_manifest_is_refused() {
    let k = keys();
    let b = signed(&k);
    let json = serde_json::to_vec_pretty(&b.manifest).unwrap(); // same content, other bytes
    let mut bytes = MAGIC.to_vec();
    bytes.extend_from_slice(&(json.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&json);
    bytes.extend_from_slice(&(b.object.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&b.object);
    bytes.extend_from_slice(&b.signer.to_bytes());
    bytes.extend_from_slice(&b.signature);
    assert!(matches!(
        Bundle::parse(&bytes),
        Err(BundleError::NotCanonical)
    ));
}

#[test]
fn truncation_and_trailing_bytes_are_refused_without_panic() {
    let k = keys();
    let bytes = signed(&k).to_bytes();
    for len in 0..bytes.len() {
        assert!(
            Bundle::parse(&bytes[..len]).is_err(),
            "truncated at {len} accepted"
        );
    }
    let mut long = bytes.clone();
    long.push(0);
    assert!(matches!(
        Bundle::parse(&long),
        Err(BundleError::Trailing(1))
    ));
    assert!(matches!(
        Bundle::parse(b"NOTSUTURE-------"),
        Err(BundleError::BadMagic)
    ));
}

#[test]
fn invalid_manifest_fields_are_refused_at_signing() {
    let k = keys();
    type Mutation = Box<dyn Fn(&mut Manifest)>;
    let cases: Vec<(&str, Mutation)> = vec![
        ("id", Box::new(|m| m.id = "bad id/../".into())),
        ("level", Box::new(|m| m.level = 0)),
        ("cves", Box::new(|m| m.cves = vec!["CVE-24-1".into()])),
        ("build_id", Box::new(|m| m.module.build_id = "XYZ".into())),
        ("functions", Box::new(|m| m.functions.clear())),
        ("size", Box::new(|m| m.functions[0].size = 3)),
        (
            "sha",
            Box::new(|m| m.functions[0].expected_sha256 = "00".into()),
        ),
        (
            "dup binding",
            Box::new(|m| {
                let b = m.bindings[0].clone();
                m.bindings.push(b)
            }),
        ),
    ];
    for (what, mutate) in cases {
        let mut m = manifest();
        mutate(&mut m);
        assert!(
            Bundle::sign(m, object(), &k.secret).is_err(),
            "{what} accepted"
        );
    }
    let mut not_rel = object();
    not_rel[16] = 2; // ET_EXEC
    assert!(matches!(
        Bundle::sign(manifest(), not_rel, &k.secret),
        Err(BundleError::Object(_))
    ));
}

#[test]
fn keys_are_private_and_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let (k, p) = generate_keypair("ops", dir.path()).unwrap();
    assert_eq!(
        std::fs::metadata(&k).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(
        generate_keypair("ops", dir.path()).is_err(),
        "overwrote a key pair"
    );
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(
        matches!(SecretKey::load(&k), Err(BundleError::Key(_))),
        "loaded a world-readable key"
    );
    assert!(PublicKey::load(&p).is_ok());
    assert!(generate_keypair("../evil", dir.path()).is_err());
}

#[test]
fn trust_dir_loads_pub_files_and_a_missing_dir_is_empty() {
    let dir = tempfile::tempdir().unwrap();
    assert!(TrustStore::load_dir(&dir.path().join("missing"))
        .unwrap()
        .is_empty());
    generate_keypair("a", dir.path()).unwrap();
    generate_keypair("b", dir.path()).unwrap();
    let t = TrustStore::load_dir(dir.path()).unwrap();
    assert_eq!(t.keys().len(), 2);
    assert_eq!(t.keys()[0].name(), "a");
}

#[test]
fn write_file_is_atomic_and_read_back() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.suture");
    let b = signed(&k);
    b.write_file(&path).unwrap();
    assert_eq!(Bundle::read_file(&path).unwrap(), b);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "no temporary file left behind");
}
