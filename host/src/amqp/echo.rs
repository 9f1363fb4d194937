//! Exchange names the broker may echo in an error, and whether the error stays readable.
//!
//! A publish to an exchange that does not exist, or that the connection's
//! user may not write to, makes the broker close the channel it came on
//! with a reply text naming the exchange, its virtual host and, for a
//! refusal, the user: `NOT_FOUND - no exchange 'NAME' in vhost 'VHOST'`,
//! `ACCESS_REFUSED - write access to exchange 'NAME' in vhost 'VHOST'
//! refused for user 'USER'`, `ACCESS_REFUSED - cannot publish to internal
//! exchange 'NAME' ...` (seen with RabbitMQ 3.10), and, under topic
//! authorisation, `ACCESS_REFUSED - write access to topic '' in exchange
//! 'NAME' ...` (55 bytes before the name, the longest).
//!
//! RabbitMQ cuts a reply text longer than 255 bytes at byte 252 and adds
//! `...` (`amqp_exception_explanation` in `rabbit_binary_generator`, 3.x
//! and 4.x), whatever character that splits. A text that is not UTF-8 is
//! a frame lapin cannot read: it ends the whole connection, every call on
//! it with it. A name chosen by someone else (a request's `reply_to`, a
//! server id a plugin calls) could so end a connection shared by everyone,
//! each time it is used. [`Echo::readable`] says whether every error
//! naming an exchange can be read: always when the name, the virtual host
//! and the user are ASCII (every byte is a character); otherwise only
//! when the longest such text fits in 255 bytes, and is not cut at all.

use super::ConnectOptions;

/// Room kept for what comes before the name: the longest known prefix is
/// 55 bytes.
const BEFORE: usize = 64;

/// What comes after the name besides the virtual host and the user:
/// `' in vhost '`, `' refused for user '` and `'`.
const AFTER: usize = "' in vhost '".len() + "' refused for user '".len() + "'".len();

/// The longest reply text the broker sends whole.
const WHOLE: usize = 255;

/// What the broker writes around an exchange's name in an error on one
/// connection's publishes: its virtual host and user, as the connection
/// options name them (the longest of each, over every broker URI).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Echo {
    /// Whether the virtual hosts and users are all ASCII.
    ascii: bool,
    /// The most bytes a virtual host and a user take together.
    around: usize,
}

impl Echo {
    /// What the broker writes around a name for connections made with
    /// `options`. An EXTERNAL login whose URI names no user is taken as
    /// an ASCII user of no length (the broker takes the name from the
    /// certificate, which the options do not read): write the user in the
    /// URI to have it counted.
    pub(crate) fn of(options: &ConnectOptions) -> Echo {
        let named = options.parse_all().unwrap_or_default();
        let pairs = named
            .iter()
            .map(|uri| (uri.vhost.as_str(), uri.authority.userinfo.username.as_str()));
        Echo::around(pairs)
    }

    fn around<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> Echo {
        let mut echo = Echo {
            ascii: true,
            around: 0,
        };
        for (vhost, user) in pairs {
            echo.ascii &= vhost.is_ascii() && user.is_ascii();
            echo.around = echo.around.max(vhost.len() + user.len());
        }
        echo
    }

    /// Whether every error the broker could send about a publish to the
    /// exchange `name` can be read.
    pub(crate) fn readable(&self, name: &str) -> bool {
        (self.ascii && name.is_ascii()) || BEFORE + name.len() + AFTER + self.around <= WHOLE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo(vhost: &str, user: &str) -> Echo {
        Echo::around([(vhost, user)].into_iter())
    }

    #[test]
    fn ascii_everywhere_is_always_readable() {
        let e = echo("/", "guest");
        assert!(e.readable(&"a".repeat(255)));
        assert!(e.readable("client_guest_ex_1b4e28ba-2fa1-11d2-883f-0016d3cca427"));
    }

    #[test]
    fn a_name_that_is_not_ascii_must_be_echoed_whole() {
        let e = echo("/", "guest");
        // 64 + 151 + 33 + 6 = 254.
        assert!(e.readable(&format!("{}é", "a".repeat(149))));
        assert!(!e.readable(&format!("{}é", "a".repeat(151))));
        // The one RabbitMQ cuts inside the character (seen with 3.10).
        assert!(!e.readable(&format!("{}éb", "a".repeat(226))));
    }

    #[test]
    fn a_vhost_or_user_that_is_not_ascii_bounds_every_name() {
        let e = echo("abcdö-1234", "guest");
        assert!(!e.readable(&format!("server_{}_ex", "a".repeat(200))));
        assert!(e.readable("server_calc_ex"));
        let e = echo("/", "jürgen");
        assert!(!e.readable(&format!("server_{}_ex", "a".repeat(164))));
        // The longest of several URIs counts.
        let e = Echo::around([("/", "guest"), ("/", "jürgen")].into_iter());
        assert!(!e.ascii && e.around == 8);
    }
}
