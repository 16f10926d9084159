// MathJax 3 for the arithmatex "generic" output: only elements of class
// "arithmatex" are typeset, written \( ... \) inline and \[ ... \] displayed.
// Loaded before javascripts/vendor/tex-svg.js (copied from the mathjax npm
// package at build time by tools/build_docs.py; never from a CDN).
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
    tags: "none"
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex"
  },
  svg: {
    fontCache: "global"
  }
};
