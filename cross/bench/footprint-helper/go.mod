module vantage.invalid/cross/bench/footprint-helper

go 1.21
