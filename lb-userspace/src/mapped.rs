//! Array maps created with `BPF_F_MMAPABLE`, mapped into the controller. Their values are read
//! and written as aligned 8-byte words with atomic loads, stores and compare-and-swap, so the
//! XDP program (which reads each word with one load) never sees half of a value being written,
//! and a walk of the flow table needs no system call per entry.

use std::{
    os::fd::AsFd as _,
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use anyhow::{Context as _, ensure};
use aya::maps::MapData;

pub struct Mapped {
    base: NonNull<AtomicU64>,
    len: usize,
    /// 8-byte words per value.
    stride: usize,
    entries: u32,
}

// SAFETY: the mapping is shared memory accessed only through atomics.
unsafe impl Send for Mapped {}
// SAFETY: as above.
unsafe impl Sync for Mapped {}

impl Mapped {
    /// Maps all values of `map` (an array map with `BPF_F_MMAPABLE`) read-write.
    ///
    /// # Errors
    /// When the map is not mmapable or its values are not whole 8-byte words.
    pub fn new(map: &MapData, name: &str) -> anyhow::Result<Self> {
        let info = map.info().with_context(|| format!("reading map {name}'s info"))?;
        let value_size = info.value_size() as usize;
        ensure!(value_size.is_multiple_of(8) && value_size > 0, "map {name}: value size {value_size} is not a multiple of 8");
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).context("page size")?;
        let bytes = value_size * info.max_entries() as usize;
        let len = bytes.div_ceil(page) * page;
        let fd = map.fd().as_fd();
        // SAFETY: a fresh shared mapping of the map's value area; nothing else aliases it in
        // this process, and it is only touched through atomics.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                0,
            )
        };
        ensure!(
            ptr != libc::MAP_FAILED,
            "mapping map {name} into memory: {} (it must be created with BPF_F_MMAPABLE)",
            std::io::Error::last_os_error()
        );
        Ok(Self { base: NonNull::new(ptr.cast()).context("mmap returned null")?, len, stride: value_size / 8, entries: info.max_entries() })
    }

    #[must_use]
    pub const fn entries(&self) -> u32 {
        self.entries
    }

    fn word(&self, index: u32, word: usize) -> &AtomicU64 {
        assert!(index < self.entries && word < self.stride, "index {index} word {word} outside the map");
        // SAFETY: inside the mapping (checked above), 8-aligned (page-aligned base, values a
        // multiple of 8 bytes), and valid for as long as `self`.
        unsafe { self.base.add(index as usize * self.stride + word).as_ref() }
    }

    /// Word `word` of value `index`.
    #[must_use]
    pub fn load(&self, index: u32, word: usize) -> u64 {
        self.word(index, word).load(Ordering::Acquire)
    }

    /// Writes word `word` of value `index` in one store.
    pub fn store(&self, index: u32, word: usize, value: u64) {
        self.word(index, word).store(value, Ordering::Release);
    }

    /// Replaces word `word` of value `index` with `new` if it still holds `old`.
    ///
    /// # Errors
    /// The word's current value when it did not hold `old`.
    pub fn compare_exchange(&self, index: u32, word: usize, old: u64, new: u64) -> Result<u64, u64> {
        self.word(index, word).compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire)
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}
