//! Per-task loop volumes on this host's real loop devices: a volume refuses writes past its size,
//! its image is root's alone, and removing or sweeping it leaves no mount, image or loop device.
//! Skips loudly without root or `mkfs.ext4`.

use capstan_containerizer::{is_mount_point, LoopVolumes, VOLUME_FS_TYPE};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

const SIZE_BYTES: u64 = 8 << 20;

#[test]
fn a_loop_volume_refuses_writes_past_its_size_and_goes_without_a_trace() {
    let test = "a_loop_volume_refuses_writes_past_its_size_and_goes_without_a_trace";
    let dir = tempfile::tempdir().unwrap();
    let volumes = match LoopVolumes::open(&dir.path().join("volumes")) {
        Ok(v) => v,
        Err(why) => {
            let _ = std::io::stderr().write_all(format!("\n!!!!! SKIPPED {test}: {why} !!!!!\n").as_bytes());
            return;
        }
    };
    let work = dir.path().join("sandboxes/7/work");
    volumes.create("7", &work, SIZE_BYTES).unwrap();
    assert!(is_mount_point(&work), "mounted on the work directory");
    assert!(!work.join("lost+found").exists(), "nothing of mkfs in the task's home");
    let image = volumes.image("7");
    let meta = std::fs::metadata(&image).unwrap();
    assert_eq!((meta.uid(), meta.permissions().mode() & 0o777, meta.len()), (0, 0o600, SIZE_BYTES));
    assert_eq!(std::fs::metadata(dir.path().join("volumes")).unwrap().permissions().mode() & 0o777, 0o700);
    // Writes stop with ENOSPC before the volume's size.
    let mut f = std::fs::File::create(work.join("fill")).unwrap();
    let block = vec![0u8; 1 << 20];
    let mut written = 0u64;
    let err = loop {
        match f.write_all(&block).and_then(|()| f.sync_all()) {
            Ok(()) => written += block.len() as u64,
            Err(e) => break e,
        }
        assert!(written <= SIZE_BYTES, "wrote {written} bytes into a volume of {SIZE_BYTES}");
    };
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    drop(f);
    // A second one, then a sweep that keeps only the first: the second goes entirely.
    let other = dir.path().join("sandboxes/8/work");
    volumes.create("8", &other, SIZE_BYTES).unwrap();
    let removed = volumes.sweep(dir.path(), |m| m == work, |name| name == "7");
    assert_eq!(removed.len(), 2, "{removed:?}");
    assert!(!is_mount_point(&other) && !volumes.image("8").exists());
    assert!(is_mount_point(&work) && image.exists(), "the kept one stays");
    // Remove: unmounted and deleted; again: nothing to do.
    volumes.remove("7", &work).unwrap();
    volumes.remove("7", &work).unwrap();
    assert!(!is_mount_point(&work) && !image.exists());
    assert!(capstan_containerizer::mount_points_below(dir.path(), VOLUME_FS_TYPE).is_empty());
}
