"""Static files of the clinician web app pages (HTML, CSS, JavaScript), served as they are."""
