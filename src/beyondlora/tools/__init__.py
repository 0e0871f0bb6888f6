"""Adapter tools: conversion between formats (extract, merge, resize and inspect arrive with the tools issue)."""
