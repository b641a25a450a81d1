//! A trace generator with the skew one public service published (130,866
//! launches in ten days, the top 20 images 80 % of them) and a tail that
//! changes: images are rebuilt (a new reference whose app layer changes and
//! whose base layer stays), new images appear every day, and now and then
//! a tail image climbs into the head while a head image falls out.
//!
//! Launches arrive as a Poisson process; run durations are exponential
//! (mean [`GenConfig::mean_duration_s`]). Everything comes from one seeded
//! generator, so a seed is a trace.

use ember_control::pullplan::Layer;

use crate::trace::Launch;

/// Knobs of [`generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct GenConfig {
    /// Days of launches.
    pub days: f64,
    /// Launches per day.
    pub launches_per_day: f64,
    /// Images at the start.
    pub images: usize,
    /// Images in the head.
    pub head: usize,
    /// The head's share of launches.
    pub head_share: f64,
    /// Images rebuilt per day (a new reference that replaces the old one).
    pub rebuilds_per_day: usize,
    /// New tail images per day.
    pub new_per_day: usize,
    /// Distinct base layers shared between images.
    pub bases: usize,
    /// Mean run duration.
    pub mean_duration_s: f64,
    /// Seed.
    pub seed: u64,
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig {
            days: 10.0,
            launches_per_day: 13_087.0,
            images: 400,
            head: 20,
            head_share: 0.8,
            rebuilds_per_day: 20,
            new_per_day: 15,
            bases: 8,
            mean_duration_s: 120.0,
            seed: 1,
        }
    }
}

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: usize) -> usize {
        (self.unit() * n as f64) as usize % n.max(1)
    }

    fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }

    fn digest(&mut self) -> String {
        format!(
            "sha256:{:016x}{:016x}{:016x}{:016x}",
            self.next(),
            self.next(),
            self.next(),
            self.next()
        )
    }
}

/// One image of the catalogue as the generator evolves it.
struct Image {
    name: String,
    version: u32,
    base: usize,
    app: Vec<Layer>,
}

const MB: u64 = 1 << 20;

fn app_layers(rng: &mut Rng) -> Vec<Layer> {
    (0..1 + rng.below(3))
        .map(|_| Layer {
            digest: rng.digest(),
            size: (5 + rng.below(120)) as u64 * MB,
        })
        .collect()
}

/// Generates a trace (see the module docs).
pub fn generate(cfg: &GenConfig) -> Vec<Launch> {
    let mut rng = Rng(cfg.seed);
    // Base layers from a slim distribution to a large runtime.
    let bases: Vec<Layer> = (0..cfg.bases.max(1))
        .map(|i| Layer {
            digest: rng.digest(),
            size: (30 + 60 * i as u64 + rng.below(40) as u64) * MB,
        })
        .collect();
    let mut next_name = 0usize;
    let mut new_image = |rng: &mut Rng| {
        next_name += 1;
        Image {
            name: format!("registry.example/app-{next_name:04}"),
            version: 1,
            base: rng.below(bases.len()),
            app: app_layers(rng),
        }
    };
    // `ranked[0]` is the most launched; weights follow the rank.
    let mut ranked: Vec<Image> = (0..cfg.images.max(1))
        .map(|_| new_image(&mut rng))
        .collect();
    let head = cfg.head.clamp(1, ranked.len());

    let weights = |n: usize| -> Vec<f64> {
        // Zipf within the head and within the tail, scaled to their shares.
        let zipf = |k: usize| -> Vec<f64> {
            let raw: Vec<f64> = (0..k).map(|i| 1.0 / (i + 1) as f64).collect();
            let sum: f64 = raw.iter().sum();
            raw.into_iter().map(|w| w / sum).collect()
        };
        let h = head.min(n);
        let mut w: Vec<f64> = zipf(h).into_iter().map(|x| x * cfg.head_share).collect();
        w.extend(zipf(n - h).into_iter().map(|x| x * (1.0 - cfg.head_share)));
        w
    };

    let mut out = Vec::new();
    let end = cfg.days * 86_400.0;
    let rate = cfg.launches_per_day / 86_400.0;
    let mut t = 0.0;
    let mut day = 0u64;
    let mut cdf = cumulative(&weights(ranked.len()));
    if rate <= 0.0 {
        return out;
    }
    loop {
        t += rng.exp(1.0 / rate);
        if t >= end {
            break;
        }
        let today = (t / 86_400.0) as u64;
        while day < today {
            day += 1;
            // Rebuilds: a new version with a new app layer, same base.
            for _ in 0..cfg.rebuilds_per_day {
                let i = rng.below(ranked.len());
                let img = &mut ranked[i];
                img.version += 1;
                let keep = img.app.len().saturating_sub(1);
                img.app.truncate(keep);
                img.app.push(Layer {
                    digest: rng.digest(),
                    size: (5 + rng.below(60)) as u64 * MB,
                });
            }
            // New images enter the tail at random ranks.
            for _ in 0..cfg.new_per_day {
                let at = head + rng.below(ranked.len() - head + 1);
                let img = new_image(&mut rng);
                ranked.insert(at, img);
            }
            // One tail image climbs into the head; the head's last falls.
            if ranked.len() > head + 1 {
                let from = head + rng.below(ranked.len() - head);
                let img = ranked.remove(from);
                ranked.insert(rng.below(head), img);
            }
            cdf = cumulative(&weights(ranked.len()));
        }
        let u = rng.unit();
        let i = cdf.partition_point(|&c| c < u).min(ranked.len() - 1);
        let img = &ranked[i];
        let mut layers = vec![bases[img.base].clone()];
        layers.extend(img.app.iter().cloned());
        out.push(Launch {
            t,
            image: format!("{}:v{}", img.name, img.version),
            layers,
            duration_s: rng.exp(cfg.mean_duration_s).clamp(1.0, 6.0 * 3600.0),
        });
    }
    out
}

fn cumulative(w: &[f64]) -> Vec<f64> {
    let mut acc = 0.0;
    w.iter()
        .map(|x| {
            acc += x;
            acc
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn reproduces_the_published_skew() {
        let cfg = GenConfig {
            days: 2.0,
            ..GenConfig::default()
        };
        let trace = generate(&cfg);
        let n = trace.len() as f64;
        assert!((n - 2.0 * cfg.launches_per_day).abs() < 0.05 * n, "{n}");
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for l in &trace {
            let name = l.image.split(':').next().expect("name");
            *counts.entry(name).or_default() += 1;
        }
        let mut c: Vec<usize> = counts.into_values().collect();
        c.sort_unstable_by(|a, b| b.cmp(a));
        let top20: usize = c.iter().take(20).sum();
        let share = top20 as f64 / n;
        // The head moves a little each day, so a bit under 80 % by name.
        assert!((0.70..0.86).contains(&share), "top-20 share {share}");
        assert!(trace.windows(2).all(|w| w[0].t <= w[1].t));
    }

    #[test]
    fn rebuilds_share_base_layers_and_seeds_repeat() {
        let cfg = GenConfig {
            days: 3.0,
            launches_per_day: 2000.0,
            ..GenConfig::default()
        };
        let a = generate(&cfg);
        assert_eq!(a, generate(&cfg));
        let refs: std::collections::BTreeSet<&str> = a.iter().map(|l| l.image.as_str()).collect();
        assert!(refs.iter().any(|r| r.ends_with(":v2")), "no rebuilds");
        let bases: std::collections::BTreeSet<&str> =
            a.iter().map(|l| l.layers[0].digest.as_str()).collect();
        assert!(bases.len() <= cfg.bases);
    }
}
