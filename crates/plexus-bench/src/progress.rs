//! The progress line on stderr: rewritten in place (at most 4 times a second) on a terminal,
//! one line a second otherwise (a log or a pipe).

use std::io::{IsTerminal, Write};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    Off,
    /// Overwrite the line with `\r`, 4 times a second.
    Terminal,
    /// A new line every second.
    Lines,
}

impl ProgressMode {
    /// `Terminal` when stderr is one, else `Lines`.
    pub fn detect() -> ProgressMode {
        if std::io::stderr().is_terminal() {
            ProgressMode::Terminal
        } else {
            ProgressMode::Lines
        }
    }

    /// How often the line is written.
    pub fn period(self) -> Duration {
        match self {
            ProgressMode::Terminal => Duration::from_millis(250),
            ProgressMode::Off | ProgressMode::Lines => Duration::from_secs(1),
        }
    }
}

/// A running progress line; [`Progress::finish`] writes the last state and stops it.
pub struct Progress {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Progress {
    pub fn start(mode: ProgressMode, line: impl Fn() -> String + Send + 'static) -> Progress {
        if mode == ProgressMode::Off {
            return Progress {
                stop: None,
                task: None,
            };
        }
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(mode.period());
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            ticks.tick().await; // the first tick is immediate
            loop {
                tokio::select! {
                    _ = ticks.tick() => write(mode, &line(), false),
                    _ = &mut stopped => {
                        write(mode, &line(), true);
                        return;
                    }
                }
            }
        });
        Progress {
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn finish(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

fn write(mode: ProgressMode, line: &str, last: bool) {
    let mut stderr = std::io::stderr().lock();
    let _ = match mode {
        ProgressMode::Terminal if last => writeln!(stderr, "\r{line}\x1b[K"),
        ProgressMode::Terminal => write!(stderr, "\r{line}\x1b[K"),
        ProgressMode::Lines => writeln!(stderr, "{line}"),
        ProgressMode::Off => Ok(()),
    };
    let _ = stderr.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_four_times_a_second_on_a_terminal() {
        assert_eq!(ProgressMode::Terminal.period(), Duration::from_millis(250));
        assert_eq!(ProgressMode::Lines.period(), Duration::from_secs(1));
    }
}
