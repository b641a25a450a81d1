//! Layers committed without a sync by an earlier boot are discarded on the
//! first store open after a reboot; within one boot they are kept.

use ember_oci::Digest;
use ember_store::{LayerRecord, Store};

#[test]
fn unsynced_layers_of_an_earlier_boot_are_discarded() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = Store::open(tmp.path()).expect("open");
    let ours = Digest::sha256_of(b"this boot");
    let old = Digest::sha256_of(b"earlier boot");
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .expect("boot id")
        .trim()
        .to_string();
    for (d, b) in [(&ours, boot.as_str()), (&old, "an-earlier-boot")] {
        std::fs::create_dir(store.layer_dir(d)).expect("layer dir");
        store
            .update_index(|ix| {
                ix.layers.insert(
                    d.clone(),
                    LayerRecord {
                        bytes: 0,
                        entries: 0,
                        unsynced_boot: Some(b.to_string()),
                    },
                );
                Ok(())
            })
            .expect("index");
    }
    // As after a reboot: the store has not checked in this boot yet.
    let _ = std::fs::remove_file(tmp.path().join("boot"));
    let store = Store::open(tmp.path()).expect("reopen");
    let ix = store.read_index().expect("index");
    assert!(ix.layers.contains_key(&ours));
    assert!(!ix.layers.contains_key(&old));
    assert!(store.layer_dir(&ours).is_dir());
    assert!(!store.layer_dir(&old).exists());
}
