//! UTC calendar periods for month- and day-to-date spend, from Unix seconds
//! (proleptic Gregorian, no time zone: the ledger's periods are UTC).

const DAY: i64 = 86_400;

/// Civil date (year, month 1-12, day 1-31) of a day count since 1970-01-01.
/// Howard Hinnant's `civil_from_days`.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Days since 1970-01-01 of a civil date (the inverse of the above).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The UTC month and day a Unix time falls in, as the ledger and the cost
/// report name them: `"2026-11"`, `"2026-11-24"`. Strings of this shape
/// order like the periods they name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Periods {
    pub month: String,
    pub day: String,
    /// Seconds from the given time to the start of the next month.
    pub month_left_secs: u64,
}

pub fn periods(unix_secs: i64) -> Periods {
    let days = unix_secs.div_euclid(DAY);
    let (y, m, d) = civil_from_days(days);
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    let next_month = days_from_civil(ny, nm, 1) * DAY;
    Periods {
        month: format!("{y:04}-{m:02}"),
        day: format!("{y:04}-{m:02}-{d:02}"),
        month_left_secs: (next_month - unix_secs).max(0) as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        // 2000-02-29 (leap, divisible by 400) and 2100-02-28 (not leap).
        assert_eq!(civil_from_days(days_from_civil(2000, 2, 29)), (2000, 2, 29));
        assert_eq!(
            civil_from_days(days_from_civil(2100, 2, 28) + 1),
            (2100, 3, 1)
        );
        for z in -800_000..800_000 {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
    }

    #[test]
    fn period_names_and_month_end() {
        // 2026-11-24T13:00:00Z
        let t = days_from_civil(2026, 11, 24) * DAY + 13 * 3_600;
        let p = periods(t);
        assert_eq!(
            (p.month.as_str(), p.day.as_str()),
            ("2026-11", "2026-11-24")
        );
        assert_eq!(p.month_left_secs as i64, 6 * DAY + 11 * 3_600);
        // The last second of a year, then the first of the next.
        let ny = days_from_civil(2027, 1, 1) * DAY;
        let p = periods(ny - 1);
        assert_eq!(
            (p.month.as_str(), p.day.as_str()),
            ("2026-12", "2026-12-31")
        );
        assert_eq!(p.month_left_secs, 1);
        let p = periods(ny);
        assert_eq!(
            (p.month.as_str(), p.day.as_str()),
            ("2027-01", "2027-01-01")
        );
        assert_eq!(p.month_left_secs as i64, 31 * DAY);
        assert!("2026-12" < "2027-01" && "2026-12-31" < "2027-01-01");
    }
}
