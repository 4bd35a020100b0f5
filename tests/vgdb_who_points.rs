//! memcheck's `who_points_at`, asked through vgdb (`leakhunt_tests::vgdb`), names the one holder
//! of each block of `who_points.c`: what leakhunt's retention paths can be checked against.

use leakhunt_tests::fixture;
use leakhunt_tests::vgdb::{who_points_at, Holder};

#[test]
fn memcheck_names_the_holder_of_each_block() {
    let exe = fixture("who_points.c");
    let answers = who_points_at(&exe, &[]);
    assert_eq!(answers.len(), 3, "{answers:#?}");
    let buckets = answers[0].0;

    // (a) The bucket array: g_registry.buckets, after the int n and its padding.
    assert_eq!(
        answers[0].1,
        [Holder::Global {
            symbol: "g_registry".into(),
            offset: 8
        }],
        "{answers:#?}"
    );
    // (b) Entry K = 3: slot 3 of the 8-pointer bucket array.
    assert_eq!(
        answers[1].1,
        [Holder::Block {
            start: buckets,
            size: 64,
            offset: 8 * 3
        }],
        "{answers:#?}"
    );
    // (c) The block only main's volatile local holds (frames: read, ask, main).
    assert_eq!(
        answers[2].1,
        [Holder::Stack {
            thread: 1,
            function: Some("main".into())
        }],
        "{answers:#?}"
    );
}
