"""Benchmarks: conversion throughput now; the lazy-start suite later."""
