//! UTC calendar periods for month- and day-to-date spend, from Unix seconds
//! (proleptic Gregorian, no time zone: the ledger's periods are UTC).

use portcullis_trail::time::{DAY_SECS as DAY, civil_from_days, days_from_civil};

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
