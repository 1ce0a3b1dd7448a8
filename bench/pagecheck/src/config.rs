//! Command-line options.

use crate::checker::Pattern;

/// Usage text.
pub const USAGE: &str = "\
usage: wanmig-pagecheck [--mib N] [--rate MIB_S] [--readrate MIB_S] [--wss MIB]
                        [--pattern seq|rand] [--run-id HEX] [--duration S]
                        [--max-print N] [--slice-ms MS] [--disk DEV [--split] [--blind]]
  --mib N          region size in MiB (default 64)
  --rate R         page writes, MiB/s (default 4; 0 = none)
  --readrate R     verification reads (sweep of the whole region), MiB/s (default 16)
  --wss W          writes go to the first W MiB of the region (default: all of it)
  --pattern P      seq (default) or rand: order of the writes within the wss
  --run-id HEX     run id tagged into every page (default: random)
  --duration S     stop after S seconds (default 0: run forever); exit 1 if errors
  --max-print N    print the first N PAGECHECK-ERROR lines (default 20)
  --slice-ms MS    pacing slice (default 0: auto, 5-50 ms, about 8 pages a slice)
  --disk DEV       check the first --mib MiB of disk DEV instead of RAM (4 KiB
                   blocks, O_DIRECT; lines DISKCHECK-*, heartbeat DHB)
  --split          (with --disk) write each block as two direct writes cut at a
                   random 512-byte boundary
  --blind          (with --disk) rewrite blocks without reading them first (the
                   sweep still verifies every block)";

/// Parsed options.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Region size, MiB.
    pub mib: u64,
    /// Write rate, MiB/s.
    pub rate: f64,
    /// Verification rate, MiB/s.
    pub readrate: f64,
    /// Write working set, MiB (`None`: the whole region).
    pub wss_mib: Option<f64>,
    /// Order of writes.
    pub pattern: Pattern,
    /// Fixed run id, or random.
    pub run_id: Option<u64>,
    /// Seconds to run; 0 = forever.
    pub duration: f64,
    /// How many error lines to print.
    pub max_print: u64,
    /// Pacing slice, milliseconds (0: auto, see [`Config::slice_ms`]).
    pub slice_ms: u64,
    /// Check this disk instead of RAM.
    pub disk: Option<String>,
    /// Write disk blocks in two parts.
    pub split: bool,
    /// Rewrite disk blocks without reading them first.
    pub blind: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            mib: 64,
            rate: 4.0,
            readrate: 16.0,
            wss_mib: None,
            pattern: Pattern::Seq,
            run_id: None,
            duration: 0.0,
            max_print: 20,
            slice_ms: 0,
            disk: None,
            split: false,
            blind: false,
        }
    }
}

/// Pages per MiB.
pub const PAGES_PER_MIB: u64 = 256;

impl Config {
    /// Parses `--key value` or `--key=value` options.
    pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Config, String> {
        let mut c = Config::default();
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            if arg == "-h" || arg == "--help" {
                return Err("help".into());
            }
            if arg == "--split" {
                c.split = true;
                continue;
            }
            if arg == "--blind" {
                c.blind = true;
                continue;
            }
            let (key, value) = match arg.split_once('=') {
                Some((k, v)) if k.starts_with("--") => (k.to_string(), v.to_string()),
                _ => {
                    if !arg.starts_with("--") {
                        return Err(format!("unexpected argument {arg:?}"));
                    }
                    let v = it.next().ok_or_else(|| format!("{arg} needs a value"))?;
                    (arg, v)
                }
            };
            match key.as_str() {
                "--mib" => c.mib = num(&key, &value)?,
                "--rate" => c.rate = rate(&key, &value)?,
                "--readrate" => c.readrate = rate(&key, &value)?,
                "--wss" => c.wss_mib = Some(rate(&key, &value)?),
                "--pattern" => {
                    c.pattern = match value.as_str() {
                        "seq" => Pattern::Seq,
                        "rand" => Pattern::Rand,
                        _ => return Err(format!("--pattern: seq or rand, not {value:?}")),
                    }
                }
                "--run-id" => {
                    let v = value.trim_start_matches("0x");
                    c.run_id = Some(
                        u64::from_str_radix(v, 16)
                            .map_err(|_| format!("--run-id: not hex: {value:?}"))?,
                    );
                }
                "--duration" => c.duration = rate(&key, &value)?,
                "--max-print" => c.max_print = num(&key, &value)?,
                "--slice-ms" => c.slice_ms = num(&key, &value)?,
                "--disk" => c.disk = Some(value),
                _ => return Err(format!("unknown option {key}")),
            }
        }
        if c.mib == 0 {
            return Err("--mib must be at least 1".into());
        }
        if (c.split || c.blind) && c.disk.is_none() {
            return Err("--split and --blind need --disk".into());
        }
        Ok(c)
    }

    /// Pages in the region.
    pub fn pages(&self) -> usize {
        (self.mib * PAGES_PER_MIB) as usize
    }

    /// Pages in the write working set.
    pub fn wss_pages(&self) -> usize {
        match self.wss_mib {
            None => self.pages(),
            Some(w) => ((w * PAGES_PER_MIB as f64).round() as usize).clamp(1, self.pages()),
        }
    }

    /// Pages written per second.
    pub fn write_pages_per_sec(&self) -> f64 {
        self.rate * PAGES_PER_MIB as f64
    }

    /// Pages verified per second.
    pub fn read_pages_per_sec(&self) -> f64 {
        self.readrate * PAGES_PER_MIB as f64
    }

    /// The pacing slice in milliseconds: as set, or else long enough for
    /// about 8 pages of work, between 5 and 50 ms (so a slow checker does
    /// not wake 200 times a second for nothing, and a fast one stays smooth).
    pub fn slice_ms(&self) -> u64 {
        if self.slice_ms > 0 {
            return self.slice_ms;
        }
        let pps = self.write_pages_per_sec() + self.read_pages_per_sec();
        if pps <= 0.0 {
            return 50;
        }
        ((8000.0 / pps).round() as u64).clamp(5, 50)
    }
}

fn num(key: &str, v: &str) -> Result<u64, String> {
    v.parse()
        .map_err(|_| format!("{key}: not a whole number: {v:?}"))
}

fn rate(key: &str, v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(format!("{key}: not a non-negative number: {v:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, String> {
        Config::parse(s.split_whitespace().map(String::from))
    }

    #[test]
    fn defaults() {
        let c = parse("").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.pages(), 64 * 256);
        assert_eq!(c.wss_pages(), c.pages());
        assert_eq!(c.write_pages_per_sec(), 1024.0);
        assert_eq!(c.read_pages_per_sec(), 4096.0);
    }

    #[test]
    fn both_spellings_and_all_options() {
        let c = parse(
            "--mib 32 --rate=0.5 --readrate 8 --wss 4 --pattern rand --run-id 0xABC \
             --duration 3 --max-print 5 --slice-ms=2",
        )
        .unwrap();
        assert_eq!(c.mib, 32);
        assert_eq!(c.rate, 0.5);
        assert_eq!(c.readrate, 8.0);
        assert_eq!(c.wss_pages(), 1024);
        assert_eq!(c.pattern, Pattern::Rand);
        assert_eq!(c.run_id, Some(0xabc));
        assert_eq!(c.duration, 3.0);
        assert_eq!(c.max_print, 5);
        assert_eq!(c.slice_ms(), 2);
        let d = parse("--disk /dev/vda --split --mib 8").unwrap();
        assert_eq!(
            (d.disk.as_deref(), d.split, d.mib),
            (Some("/dev/vda"), true, 8)
        );
    }

    #[test]
    fn auto_slice_follows_the_rates() {
        assert_eq!(parse("").unwrap().slice_ms(), 5);
        assert_eq!(parse("--rate 0.0625 --readrate 1").unwrap().slice_ms(), 29);
        assert_eq!(parse("--rate 0 --readrate 0").unwrap().slice_ms(), 50);
        assert_eq!(parse("--rate 1000").unwrap().slice_ms(), 5);
    }

    #[test]
    fn wss_is_clamped_to_the_region() {
        assert_eq!(parse("--mib 2 --wss 100").unwrap().wss_pages(), 512);
        assert_eq!(parse("--mib 2 --wss 0").unwrap().wss_pages(), 1);
    }

    #[test]
    fn bad_input_is_refused() {
        for bad in [
            "--mib 0",
            "--mib x",
            "--rate -1",
            "--rate nan",
            "--pattern zigzag",
            "--run-id zz",
            "--bogus 1",
            "stray",
            "--rate",
            "--split",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
