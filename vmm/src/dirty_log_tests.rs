//! Tests of `dirty_log.rs`: the hot-page plan against models of KVM's dirty bits, and harvests
//! from a model of the slots' logs (failures included).

use super::*;

/// KVM's dirty bits per slot of a `mem`-byte guest, as the model sees them; `get` resets them
/// unless `manual`; a call of the slot in `fail_get`/`fail_clear` fails (once). Its `clear`
/// refuses what KVM refuses.
#[derive(Default)]
struct Slots {
    bits: Vec<Vec<u64>>,
    mem: u64,
    manual: bool,
    fail_get: Option<u32>,
    fail_clear: Option<u32>,
}

impl Slots {
    fn two(manual: bool) -> Slots {
        Slots::of(MEM, manual)
    }

    fn of(mem: u64, manual: bool) -> Slots {
        let bits = slot_words(mem).iter().map(|w| vec![0; w.1.len()]).collect();
        Slots {
            bits,
            mem,
            manual,
            ..Default::default()
        }
    }

    /// The vCPU writes page `pfn` of the linear image.
    fn write(&mut self, pfn: u64) {
        let (slot, r, _) = slot_words(self.mem)
            .into_iter()
            .find(|(_, r, _)| r.contains(&((pfn / 64) as usize)))
            .unwrap();
        self.bits[slot as usize][pfn as usize / 64 - r.start] |= 1 << (pfn % 64);
    }

    /// True if page `pfn` is set in KVM's log (written and not cleared since).
    fn is_set(&self, pfn: u64) -> bool {
        let (slot, r, _) = slot_words(self.mem)
            .into_iter()
            .find(|(_, r, _)| r.contains(&((pfn / 64) as usize)))
            .unwrap();
        self.bits[slot as usize][pfn as usize / 64 - r.start] & (1 << (pfn % 64)) != 0
    }
}

impl SlotLog for Slots {
    fn get(&mut self, slot: u32, bitmap: &mut [u64]) -> Result<()> {
        if self.fail_get.take_if(|s| *s == slot).is_some() {
            return Err(Error::Host("injected GET failure".into()));
        }
        bitmap.copy_from_slice(&self.bits[slot as usize]);
        if !self.manual {
            self.bits[slot as usize].fill(0);
        }
        Ok(())
    }

    fn clear(&mut self, slot: u32, bitmap: &mut [u64], first: u64, count: u64) -> Result<()> {
        if self.fail_clear.take_if(|s| *s == slot).is_some() {
            return Err(Error::Host("injected CLEAR failure".into()));
        }
        // KVM_CLEAR_DIRTY_LOG's checks (kvm_clear_dirty_log_protect).
        let pages = slot_words(self.mem)[slot as usize].2;
        assert_eq!(first % 64, 0, "first page {first}");
        assert!(
            first <= pages && count <= pages - first,
            "{first}+{count} > {pages}"
        );
        assert!(
            count.is_multiple_of(64) || first + count == pages,
            "{first}+{count} of {pages}"
        );
        assert!(bitmap.len() as u64 * 64 >= count);
        let w0 = (first / 64) as usize;
        for (i, b) in bitmap.iter().take(count.div_ceil(64) as usize).enumerate() {
            self.bits[slot as usize][w0 + i] &= !b;
        }
        Ok(())
    }
}

/// A guest with both slots (3.25 GiB below the MMIO hole, the rest above 4 GiB).
const MEM: u64 = 4 << 30;

#[test]
fn a_harvest_that_fails_after_clearing_a_slot_hands_its_pages_to_the_next() {
    let low = 5;
    let high = crate::layout::MMIO_BASE / crate::layout::PAGE_SIZE + 7;
    let mut kvm = Slots::two(true);
    let mut log = KvmDirtyLog::manual_model();
    kvm.write(low);
    kvm.write(high);
    // Slot 0 is cleared (page `low` write-protected, its bit gone), then slot 1 fails.
    kvm.fail_clear = Some(1);
    assert!(log.harvest_from(&mut kvm, MEM, false).is_err());
    assert_eq!(kvm.bits[0].iter().map(|w| w.count_ones()).sum::<u32>(), 0);
    let next = log.harvest_from(&mut kvm, MEM, false).unwrap();
    assert_eq!(next.pages(u64::MAX), vec![low, high], "nothing lost");
    // Carried once: the harvest after has nothing.
    assert!(log.harvest_from(&mut kvm, MEM, false).unwrap().is_empty());
}

#[test]
fn a_classic_harvest_that_fails_after_reading_a_slot_hands_its_pages_to_the_next() {
    let mut kvm = Slots::two(false);
    let mut log = KvmDirtyLog::default();
    kvm.write(9);
    // Reading slot 0 reset it; reading slot 1 fails.
    kvm.fail_get = Some(1);
    assert!(log.harvest_from(&mut kvm, MEM, false).is_err());
    kvm.write(10);
    let next = log.harvest_from(&mut kvm, MEM, false).unwrap();
    assert_eq!(next.pages(u64::MAX), vec![9, 10]);
}

#[test]
fn a_harvest_clears_what_is_not_hot_in_both_slots() {
    let mut kvm = Slots::two(true);
    let mut log = KvmDirtyLog::manual_model();
    let high = crate::layout::MMIO_BASE / crate::layout::PAGE_SIZE + 64 * 3 + 1;
    for p in [1, 700, high] {
        kvm.write(p);
    }
    let got = log.harvest_from(&mut kvm, MEM, false).unwrap();
    assert_eq!(got.pages(u64::MAX), vec![1, 700, high]);
    assert!(kvm.bits.iter().flatten().all(|&w| w == 0), "all cleared");
    assert!(log.harvest_from(&mut kvm, MEM, false).unwrap().is_empty());
}

#[test]
fn a_page_hot_after_its_harvests_stays_set_in_kvm_and_is_reported_without_a_write() {
    let mut kvm = Slots::two(true);
    let mut log = KvmDirtyLog::manual_model();
    // The hot page's word lies inside the span cleared each time: pages written once, below
    // and above it, are cleared in every harvest.
    let hot = 2000;
    for i in 0..u64::from(HOT_AFTER) + 2 {
        let once = [5 + i, 4000 + i];
        once.iter().for_each(|&p| kvm.write(p));
        if i < u64::from(HOT_AFTER) {
            kvm.write(hot);
        }
        let got = log.harvest_from(&mut kvm, MEM, false).unwrap();
        assert!(got.contains(hot), "harvest {i}: reported, written or hot");
        // Cleared (write-protected) until the harvest that makes it hot, set from then on.
        assert_eq!(
            kvm.is_set(hot),
            i + 1 >= u64::from(HOT_AFTER),
            "harvest {i}"
        );
        assert!(
            once.iter().all(|&p| !kvm.is_set(p)),
            "written once: cleared"
        );
    }
}

#[test]
fn a_clear_in_the_last_partial_word_of_a_slot_ends_at_the_slot() {
    // A high slot of 100 pages: its second word is partial.
    let mem = crate::layout::MMIO_BASE + 100 * crate::layout::PAGE_SIZE;
    let high = crate::layout::MMIO_BASE / crate::layout::PAGE_SIZE;
    let mut kvm = Slots::of(mem, true);
    let mut log = KvmDirtyLog::manual_model();
    for p in [high + 99, high + 70, 3] {
        kvm.write(p);
    }
    let got = log.harvest_from(&mut kvm, mem, false).unwrap();
    assert_eq!(got.pages(u64::MAX), vec![3, high + 70, high + 99]);
    assert!(kvm.bits.iter().flatten().all(|&w| w == 0), "all cleared");
}

#[test]
fn a_clear_covers_the_span_of_words_with_pages_to_clear_and_ends_inside_its_slot() {
    // A low slot of 3 words (192 pages) and a high one of 2 words, 100 pages.
    let clear = PageSet::from_pages(&[70, 130, 200, 250]);
    assert_eq!(clear_span(&clear, &(0..3), 192), Some((1..=2, 64, 128)));
    assert_eq!(
        clear_span(&clear, &(3..5), 100),
        Some((3..=3, 0, 64)),
        "words 3 only: a whole word"
    );
    let tail = PageSet::from_pages(&[192 + 99]);
    assert_eq!(
        clear_span(&tail, &(3..5), 100),
        Some((4..=4, 64, 36)),
        "the slot's last, partial word: the count reaches its end"
    );
    assert_eq!(clear_span(&tail, &(0..3), 192), None);
    assert_eq!(clear_span(&PageSet::new(), &(0..3), 192), None);
}

#[test]
fn a_page_written_once_per_epoch_before_its_early_copy_still_becomes_hot() {
    let mut log = KvmDirtyLog::manual_model();
    let page = vec![1u64 << 5];
    let none = vec![0u64];
    let mut hot_at = None;
    for epoch in 0..5 {
        // The early (running) harvest finds it, the paused one does not.
        let running = log.plan_bits(&page, 64, true);
        log.plan_bits(&none, 64, false);
        if running[0] == 0 && hot_at.is_none() {
            hot_at = Some(epoch);
        }
    }
    // Cleared by the early harvests of epochs 0-2 (which make it hot at their pause);
    // left writable from epoch 3 on.
    assert_eq!(hot_at, Some(HOT_AFTER as usize));
}

#[test]
fn at_most_hot_max_pages_are_hot_and_the_rest_cool_down_at_once() {
    let mut log = KvmDirtyLog::manual_model();
    let pages = 4 * HOT_MAX as u64;
    let all = vec![u64::MAX; (pages / 64) as usize];
    let mut kept = 0;
    for _ in 0..HOT_AFTER {
        let clear = log.plan_clear_bits(&all, pages);
        kept = all
            .iter()
            .zip(&clear)
            .map(|(a, c)| (a & !c).count_ones())
            .sum::<u32>();
    }
    assert_eq!(kept as usize, HOT_MAX, "only HOT_MAX pages stay writable");
    // The guest stops writing: KVM reports only the hot pages (left set), and the next
    // harvest keeps those and nothing else.
    let reported: Vec<u64> = all
        .iter()
        .zip(&log.plan_clear_bits(&all, pages))
        .map(|(a, c)| a & !c)
        .collect();
    let again = log.plan_clear_bits(&reported, pages);
    let still: u32 = reported
        .iter()
        .zip(&again)
        .map(|(r, c)| (r & !c).count_ones())
        .sum();
    assert!(still as usize <= HOT_MAX);
}

/// KVM's dirty bits as the model sees them: set by a write, cleared only by a clear.
struct KvmModel {
    log: KvmDirtyLog,
    bits: Vec<u64>,
    pages: u64,
}

impl KvmModel {
    fn new(pages: u64) -> KvmModel {
        KvmModel {
            log: KvmDirtyLog::manual_model(),
            bits: vec![0; (pages / 64) as usize],
            pages,
        }
    }

    fn write(&mut self, pfn: u64) {
        self.bits[(pfn / 64) as usize] |= 1 << (pfn % 64);
    }

    /// A harvest: reports every set bit and clears what the log says; returns the pages
    /// left set (writable, hot).
    fn harvest(&mut self, running: bool) -> u32 {
        let clear = self.log.plan_bits(&self.bits, self.pages, running);
        for (b, c) in self.bits.iter_mut().zip(&clear) {
            *b &= !c;
        }
        self.bits.iter().map(|w| w.count_ones()).sum()
    }
}

/// Which of `harvests` paused harvests leave a page writable, the page written in those
/// where `written(i)`.
fn writable_when(harvests: usize, written: impl Fn(usize) -> bool) -> Vec<bool> {
    let mut m = KvmModel::new(64);
    (0..harvests)
        .map(|i| {
            if written(i) {
                m.write(7);
            }
            m.harvest(false) > 0
        })
        .collect()
}

#[test]
fn a_page_dirty_in_three_harvests_stays_hot_for_a_while_then_is_protected_again() {
    let writable = writable_when(HOT_AFTER as usize + HOT_FOR as usize + 4, |_| true);
    // Harvests 1 and 2 clear it; the 3rd makes it hot.
    assert_eq!(&writable[..3], &[false, false, true]);
    let hot = writable[2..].iter().take_while(|&&w| w).count();
    assert_eq!(hot, HOT_FOR as usize, "writable for HOT_FOR harvests");
    // When its time is up it is cleared once; still written, it is hot again at once.
    let first_cold = 2 + HOT_FOR as usize;
    assert!(!writable[first_cold]);
    assert!(writable[first_cold + 1]);
}

#[test]
fn a_page_of_alternating_epochs_becomes_hot_and_one_written_once_or_rarely_does_not() {
    // 16 closed-loop clients in two cohorts: each one's buffers in every other epoch.
    let alternate = writable_when(12, |i| i % 2 == 0);
    assert_eq!(&alternate[..4], &[false; 4], "{alternate:?}");
    assert!(alternate[4..].iter().all(|&w| w), "{alternate:?}");
    let w = HOT_WINDOW as usize;
    // Written once (a churn): never hot, and cleared every time it is reported.
    assert!(writable_when(20, |i| i == 3).iter().all(|&w| !w));
    // Rarer than the window: never hot.
    let rare = writable_when(10 * w, |i| i % (w + 1) == 0);
    assert!(rare.iter().all(|&w| !w), "{rare:?}");
}

/// Pages left writable after 8 harvests of `n` pages written every other epoch.
fn hot_of_every_other_epoch(n: u64) -> u32 {
    let mut m = KvmModel::new(n.next_multiple_of(64));
    let mut hot = 0;
    for i in 0..8 {
        if i % 2 == 0 {
            (0..n).for_each(|pfn| m.write(pfn));
        }
        hot = m.harvest(false);
    }
    hot
}

#[test]
fn pages_of_every_other_epoch_are_hot_only_a_few_and_never_in_a_churn() {
    assert_eq!(hot_of_every_other_epoch(20), 20, "a few socket buffers");
    assert_eq!(hot_of_every_other_epoch(200) as usize, HOT_SPARSE_MAX);
    // 2,048 pages: a churn, whose pauses would copy them.
    assert_eq!(hot_of_every_other_epoch(2048), 0);
}

#[test]
fn pages_clean_for_a_while_are_forgotten() {
    let mut log = KvmDirtyLog::manual_model();
    log.plan_clear_bits(&[u64::MAX], 64);
    for _ in 1..HOT_WINDOW {
        log.plan_clear_bits(&[0], 64);
    }
    let next = log.harvests + 1;
    assert_eq!(log.remembered(next), 64, "remembered within the window");
    log.plan_clear_bits(&[0], 64);
    let left = log.remembered(log.harvests + 1);
    assert_eq!(left, 0, "{left} remembered");
}

#[test]
fn a_busy_harvest_forgets_the_pages_clean_in_it() {
    let mut log = KvmDirtyLog::manual_model();
    let page = vec![1u64, 0, 0, 0, 0, 0, 0, 0];
    let mut churn = vec![u64::MAX; 8];
    churn[0] = 0;
    log.plan_clear_bits(&page, 512);
    // 448 other pages: busy; page 0 clean in it.
    log.plan_clear_bits(&churn, 512);
    log.plan_clear_bits(&page, 512);
    assert_eq!(log.view(0, log.harvests + 1).score, 1, "counted afresh");
    // The same with a quiet harvest between: remembered within the window.
    let mut log = KvmDirtyLog::manual_model();
    log.plan_clear_bits(&page, 512);
    log.plan_clear_bits(&[0; 8], 512);
    log.plan_clear_bits(&page, 512);
    assert_eq!(log.view(0, log.harvests + 1).score, 2);
}

#[test]
fn a_page_dirty_long_ago_counts_afresh_and_the_window_spans_the_packed_clock_wrapping() {
    let page = [1u64];
    let mut log = KvmDirtyLog::manual_model();
    log.plan_clear_bits(&page, 64);
    log.plan_clear_bits(&page, 64);
    // 2^32 quiet harvests later (weeks of checkpoints): not two writes within the window.
    log.harvests += 1 << 32;
    log.plan_clear_bits(&page, 64);
    assert_eq!(log.view(0, log.harvests + 1).score, 1);
    // Across the packed clock's wrap (2^48): one clean harvest between is within it.
    log.harvests = LAST_MASK - 1;
    log.plan_clear_bits(&page, 64);
    log.plan_clear_bits(&[0], 64);
    log.plan_clear_bits(&page, 64);
    assert_eq!(log.view(0, log.harvests + 1).score, 2);
}

#[test]
fn a_page_made_hot_after_an_early_harvest_cleared_it_still_counts_against_the_cap() {
    let pages = 2 * HOT_MAX as u64;
    let mut m = KvmModel::new(pages);
    let b = 0..HOT_MAX as u64 - 50;
    let c = HOT_MAX as u64..HOT_MAX as u64 + 200;
    for epoch in 1..=5 {
        // B: written before the early copy in epochs 1-3 (hot at pause 3 through `seen`,
        // but write-protected by the early copy), not in 4, again in 5.
        if epoch != 4 {
            b.clone().for_each(|p| m.write(p));
        }
        if epoch <= 3 {
            m.harvest(true);
        }
        // C: written from epoch 2 on, only before the pause: hot at pause 4.
        if epoch >= 2 {
            c.clone().for_each(|p| m.write(p));
        }
        let hot = m.harvest(false);
        assert!(hot as usize <= HOT_MAX, "pause {epoch}: {hot} pages hot");
    }
}

#[test]
fn the_caps_hold_through_early_harvests_quiet_pauses_and_churns() {
    let pages = 2 * HOT_MAX as u64;
    let mut m = KvmModel::new(pages);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for epoch in 0..400u64 {
        let quiet = rand(8) == 0;
        // A group written before an early copy in most epochs (a page of it made hot
        // through `seen` is write-protected in KVM: absent from the next pause if not
        // written), one written every epoch competing for room, one every other epoch, a
        // few dozen socket buffers every other epoch, and random pages.
        for pfn in (0..HOT_MAX as u64 - 50).filter(|_| !quiet) {
            m.write(pfn);
        }
        if rand(2) == 0 {
            m.harvest(true);
        }
        for pfn in HOT_MAX as u64..HOT_MAX as u64 + 200 {
            m.write(pfn);
        }
        if epoch % 2 == 0 {
            for pfn in HOT_MAX as u64 + 200..HOT_MAX as u64 + 500 {
                m.write(pfn);
            }
        }
        for pfn in 0..40 {
            if (epoch + pfn) % 2 == 0 {
                m.write(pages - 1 - pfn);
            }
        }
        for _ in 0..rand(600) {
            m.write(rand(pages));
        }
        let hot = m.harvest(false);
        assert!(hot as usize <= HOT_MAX, "epoch {epoch}: {hot} pages hot");
        let now = m.log.harvests + 1;
        let pfns = 0..m.pages;
        let sparse = pfns.filter(|&p| m.log.view(p, now).hot_left > 0 && m.log.view(p, now).sparse);
        let sparse = sparse.count();
        assert!(sparse <= HOT_SPARSE_MAX, "epoch {epoch}: {sparse} sparse");
    }
}
