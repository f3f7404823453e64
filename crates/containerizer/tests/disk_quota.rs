//! Project quotas on real file systems (loop-mounted images): the project id glue on xfs, and a
//! sandbox held to its limit where the kernel has quota support (xfs `prjquota`, or ext4 made
//! with `-O quota,project` and mounted with `prjquota`). Each part skips loudly when this host
//! lacks the tool or the kernel support it needs.

use capstan_containerizer::{project_id, set_project_id, ProjectQuotas};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Mounted image, unmounted when dropped.
struct Volume {
    mount: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Volume {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).status();
    }
}

fn skip(test: &str, why: &str) {
    let _ = std::io::stderr().write_all(format!("\n!!!!! SKIPPED {test}: {why} !!!!!\n").as_bytes());
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// A `size_bytes` image made by `mkfs` and mounted with `options`; `Err` says why not.
fn volume(mkfs: &[&str], options: &str, size_bytes: u64) -> Result<Volume, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("it must run as root (it mounts file systems)".into());
    }
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let image = dir.path().join("fs.img");
    std::fs::File::create(&image).and_then(|f| f.set_len(size_bytes)).map_err(|e| e.to_string())?;
    run(Command::new(mkfs[0]).args(&mkfs[1..]).arg(&image))?;
    let mount = dir.path().join("mnt");
    std::fs::create_dir(&mount).map_err(|e| e.to_string())?;
    run(Command::new("mount").args(["-o", &format!("loop,{options}")]).arg(&image).arg(&mount))?;
    Ok(Volume { mount, _dir: dir })
}

#[test]
fn a_directory_gets_a_project_id_that_new_entries_inherit() {
    let test = "a_directory_gets_a_project_id_that_new_entries_inherit";
    // xfs takes project ids with or without quotas; ext4 only with quota support in the kernel.
    let v = match volume(&["mkfs.xfs", "-q", "-f"], "defaults", 320 << 20) {
        Ok(v) => v,
        Err(why) => return skip(test, &why),
    };
    let sandbox = v.mount.join("0000000000000001");
    std::fs::create_dir(&sandbox).unwrap();
    assert_eq!(project_id(&sandbox).unwrap(), (0, false));
    set_project_id(&sandbox, 0x4000_0001).unwrap();
    assert_eq!(project_id(&sandbox).unwrap(), (0x4000_0001, true));
    std::fs::create_dir_all(sandbox.join("work/tmp")).unwrap();
    std::fs::write(sandbox.join("work/tmp/file"), b"x").unwrap();
    assert_eq!(project_id(&sandbox.join("work/tmp")).unwrap(), (0x4000_0001, true), "inherited at any depth");
    // What the file system's own tool reads back.
    let out = Command::new("xfs_io").args(["-c", "lsproj"]).arg(sandbox.join("work/tmp/file")).output();
    if let Ok(out) = out {
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("projid = {}", 0x4000_0001));
    }
    // Without prjquota the agent must fall back, and say why.
    let why = ProjectQuotas::detect(&v.mount).unwrap_err();
    assert!(why.contains("not enabled") || why.contains("quota"), "{why}");
}

/// Writes `fill` below `dir` in 1 MiB blocks until a write fails; returns the bytes written
/// and the error.
fn fill(dir: &Path) -> (u64, std::io::Error) {
    let mut f = std::fs::File::create(dir.join("fill")).unwrap();
    let block = vec![0x5a_u8; 1 << 20];
    let mut written = 0_u64;
    loop {
        match f.write(&block).and_then(|n| f.sync_data().map(|()| n)) {
            Ok(n) => written += n as u64,
            Err(e) => return (written, e),
        }
        assert!(written < 1 << 30, "1 GiB written without an error: no limit holds");
    }
}

#[test]
fn writes_below_a_sandbox_stop_at_its_project_quota() {
    let test = "writes_below_a_sandbox_stop_at_its_project_quota";
    let attempts: [(&[&str], &str); 2] =
        [(&["mkfs.xfs", "-q", "-f"], "prjquota"), (&["mkfs.ext4", "-q", "-F", "-O", "quota,project"], "prjquota")];
    let mut refused = Vec::new();
    let v = attempts.iter().find_map(|(mkfs, options)| match volume(mkfs, options, 320 << 20) {
        Ok(v) => Some(v),
        Err(why) => {
            refused.push(why);
            None
        }
    });
    let Some(v) = v else {
        let why = format!("no file system with project quotas can be mounted here: {}", refused.join("; "));
        if std::env::var("CAPSTAN_REQUIRE_PROJECT_QUOTA").as_deref() == Ok("1") {
            panic!("{test}: {why}, and CAPSTAN_REQUIRE_PROJECT_QUOTA=1 forbids skipping");
        }
        return skip(test, &why);
    };
    let _ = std::fs::remove_dir(v.mount.join("lost+found"));
    let quotas = ProjectQuotas::detect(&v.mount).expect("project quotas detected on a prjquota mount");
    let sandbox = v.mount.join("00000000000000aa");
    std::fs::create_dir(&sandbox).unwrap();
    const LIMIT_BYTES: u64 = 16 << 20;
    let id = quotas.limit(&sandbox, 0xaa, LIMIT_BYTES).unwrap();
    assert_eq!(project_id(&sandbox).unwrap(), (id, true));
    std::fs::create_dir_all(sandbox.join("work")).unwrap();
    let (written, error) = fill(&sandbox.join("work"));
    assert!(
        matches!(error.raw_os_error(), Some(libc::EDQUOT) | Some(libc::ENOSPC)),
        "the write past the limit fails with EDQUOT or ENOSPC: {error}"
    );
    assert!(written <= LIMIT_BYTES, "{written} bytes written against a {LIMIT_BYTES}-byte quota");
    assert!(written >= LIMIT_BYTES - (2 << 20), "only {written} bytes of {LIMIT_BYTES} could be written");
    // A second sandbox gets another project, with a limit of its own.
    let other = v.mount.join("00000000000000ab");
    std::fs::create_dir(&other).unwrap();
    let second = quotas.limit(&other, 0xaa, LIMIT_BYTES).unwrap();
    assert_ne!(second, id, "a project id in use is not given twice");
}
